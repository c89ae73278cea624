"""The recipe zoo: sourced values, a tiny training run of every shipped recipe, and the keys they need.

``SOURCED`` holds, independently of the recipe files, the authors' values (key, value, source) for
every paper recipe (audit: shared/research/recipes-sources.md); each recipe is checked against it.
Every shipped recipe then trains 2 optimizer steps in-process with its family's tiny random model,
keeping every other key it sets (template, LoRA incl. vision targets, schedule, epochs); only the
checkpoint, the batch words and the image resolution bounds shrink to test size.
"""

from __future__ import annotations

import io
import json
import math
import tarfile

import pytest
import torch
from PIL import Image

from embedkit.config.loader import available_recipes, compose
from embedkit.data.batch import ChunkCollate
from embedkit.data.schema import Example, Item
from embedkit.errors import ConfigError, UserError
from embedkit.training.optim import build_optimizer, build_scheduler, lr_multiplier, total_steps

LLAVE_2B = "DeepLearnXMU/LLaVE@2c23053 README.md Training (script)"
LLAVE_CODE = "DeepLearnXMU/LLaVE@2c23053 llava/train/train.py, llava_qwen.py, loss.py"
LLAVE_TRAINER = "DeepLearnXMU/LLaVE@2c23053 llava/train/llava_trainer.py"
LLAVE_11 = "XMUDeepLIT/LLaVE#11 (maintainer: 0.5B/7B checkpoints, 7B lr 5e-6, rest unchanged)"
V1_README = "TIGER-AI-Lab/VLM2Vec v1@28fdbdd README.md training command"
V1_CODE = "TIGER-AI-Lab/VLM2Vec v1@28fdbdd src/arguments.py, src/model.py"
V1_NAME = "checkpoint name TIGER-Lab/MMEB.lora8.bs1024"
V1_7B = "VLM2Vec v1 examples/qwen2vl/qwen2vl_bytask.sh run name (lora8, bs1024, GCq4p4, lr2e5, step2kwarm100)"
V2_SCRIPT = "TIGER-AI-Lab/VLM2Vec main@6e1e1d4 experiments/public/train/train_v2-qwen2vl-2B.sh"
V2_CODE = "TIGER-AI-Lab/VLM2Vec main@6e1e1d4 src/arguments.py, src/model/model.py"

_LLAVE = [  # shared by the three LLaVE sizes (issue #11: "keep the other settings unchanged")
    ("model.backbone.name", "llava_onevision", LLAVE_2B),
    ("model.backbone.train_projector", True, LLAVE_2B + ": mm_tunable_parts mm_mlp_adapter,mm_language_model"),
    ("model.backbone.freeze_vision", True, LLAVE_CODE),
    ("model.backbone.max_grid", 2, LLAVE_2B + ': image_grid_pinpoints "(1x1),...,(2x2)"'),
    ("model.backbone.anyres_max", 9, LLAVE_2B + ": anyres_max_9"),
    ("model.backbone.max_length", 4096, LLAVE_2B + ": model_max_length 4096"),
    ("model.backbone.prompt", "chat", LLAVE_CODE + ": preprocess_qwen"),
    ("model.backbone.system_prompt", "You are a helpful assistant.", LLAVE_CODE + ": preprocess_qwen"),
    ("model.backbone.append_eos", False, LLAVE_CODE + ": the template's final newline is pooled"),
    ("model.pooling.name", "last_token", LLAVE_CODE),
    ("model.lora.enabled", False, LLAVE_2B + ": lora_enable False"),
    ("loss.name", "hardness_weighted", LLAVE_CODE),
    ("loss.alpha", 9.0, LLAVE_2B + ": ALPHA=9"),
    ("loss.temperature", 0.02, LLAVE_CODE + ": logit_scale 50"),
    ("loss.bidirectional", True, LLAVE_CODE),
    ("data.train.num_negatives", 0, LLAVE_CODE),
    ("data.train.group_by", "modality", LLAVE_TRAINER + ": --group_by_modality_length"),
    ("data.train.length_order", "balanced", LLAVE_TRAINER + ": split_to_even_chunks"),
    ("train.global_batch_size", 32, LLAVE_CODE + ": loss over 4/GPU x 8 GPUs"),
    ("train.accumulate_steps", 8, LLAVE_2B + ": gradient_accumulation_steps 8"),
    ("train.schedule", "cosine", LLAVE_2B),
    ("train.warmup", 0.03, LLAVE_2B),
    ("train.weight_decay", 0.0, LLAVE_2B),
    ("train.clip_grad_norm", 1.0, "LLaVE scripts/zero3.json gradient_clipping auto (HF 1.0)"),
    ("trainer.max_epochs", 1, LLAVE_2B + ": num_train_epochs 1"),
    ("trainer.tf32", True, LLAVE_2B + ": tf32 True"),
    ("seed", 42, "HF TrainingArguments default"),
]
_VLM2VEC_QWEN = [
    ("model.backbone.name", "qwen2_vl", V1_README),
    ("model.backbone.append_eos", False, V1_README + ": --pooling last, raw text"),
    ("model.backbone.resize", [1344, 1344], "VLM2Vec v1 src/dataset.py high-res"),
    ("model.backbone.min_pixels", 256 * 28 * 28, "VLM2Vec v1 src/model_utils.py"),
    ("model.backbone.max_pixels", 1280 * 28 * 28, "VLM2Vec v1 src/model_utils.py"),
    ("model.backbone.max_length", 4096, V1_README + ": --max_len 4096"),
    ("model.lora.enabled", True, V1_README),
    ("model.lora.alpha", 64, V1_CODE), ("model.lora.dropout", 0.1, V1_CODE),
    ("model.lora.dora", True, V1_CODE), ("model.lora.init", "gaussian", V1_CODE),
    ("loss.name", "infonce", V1_CODE), ("loss.temperature", 0.02, V1_README), ("loss.bidirectional", False, V1_CODE),
    ("train.global_batch_size", 1024, V1_README + ": 128 x 8"), ("train.accumulate_steps", 1, "VLM2Vec issue #50"),
    ("train.chunk_size", 4, V1_README + ": gc chunk 4"), ("train.lr", 2e-5, V1_README),
    ("train.schedule", "linear", V1_README), ("trainer.max_steps", 2000, V1_README),
]
SOURCED: dict[str, list[tuple[str, object, str]]] = {
    "llave_2b": _LLAVE + [("train.lr", 1e-5, LLAVE_2B)],
    "llave_0.5b": _LLAVE + [("model.backbone.path", "llava-hf/llava-onevision-qwen2-0.5b-ov-hf", LLAVE_11),
                            ("train.lr", 1e-5, LLAVE_11)],
    "llave_7b": _LLAVE + [("model.backbone.path", "llava-hf/llava-onevision-qwen2-7b-ov-hf", LLAVE_11),
                          ("train.lr", 5e-6, LLAVE_11)],
    "vlm2vec_phi35v_4b": [
        ("model.backbone.name", "phi3_v", V1_README),
        ("model.backbone.num_crops", 4, V1_README), ("model.backbone.max_length", 256, V1_README),
        ("model.backbone.append_eos", False, "VLM2Vec README @0e43764 'changing eos to last token'"),
        ("model.lora.enabled", True, V1_NAME), ("model.lora.r", 8, V1_NAME),
        ("model.lora.alpha", 64, V1_CODE), ("model.lora.dropout", 0.1, V1_CODE),
        ("model.lora.dora", True, V1_CODE), ("model.lora.init", "gaussian", V1_CODE),
        ("model.lora.vision", True, V1_CODE + ": suffix targets hit CLIP attention"),
        ("loss.name", "infonce", V1_CODE), ("loss.temperature", 0.02, V1_README),
        ("loss.bidirectional", False, V1_CODE),
        ("train.global_batch_size", 1024, V1_NAME), ("train.accumulate_steps", 1, "VLM2Vec issue #50"),
        ("train.lr", 2e-5, V1_README), ("train.schedule", "linear", V1_README), ("train.warmup", 0.1, V1_README),
        ("trainer.max_steps", 2000, V1_README),
    ],
    "vlm2vec_qwen2vl_2b": _VLM2VEC_QWEN + [
        ("model.backbone.path", "Qwen/Qwen2-VL-2B-Instruct", V1_README), ("model.lora.r", 16, V1_CODE),
        ("train.warmup", 0.1, V1_README + ": 200 of 2000"),
    ],
    "vlm2vec_qwen2vl_7b": _VLM2VEC_QWEN + [
        ("model.backbone.path", "Qwen/Qwen2-VL-7B-Instruct", V1_README), ("model.lora.r", 8, V1_7B),
        ("train.warmup", 0.05, V1_7B),
    ],
    "vlm2vec_v2_qwen2vl_2b": [
        ("model.backbone.name", "qwen2_vl", V2_SCRIPT),
        ("model.backbone.path", "Qwen/Qwen2-VL-2B-Instruct", V2_SCRIPT),
        ("model.backbone.append_eos", False, V2_CODE + ": --pooling eos = last non-pad token"),
        ("model.backbone.min_pixels", 3136, V2_CODE), ("model.backbone.max_pixels", 1003520, V2_CODE),
        ("model.backbone.resize", None, V2_CODE + ": processor resize only"),
        ("model.lora.enabled", True, V2_SCRIPT), ("model.lora.r", 16, V2_SCRIPT),
        ("model.lora.alpha", 64, V2_CODE + " default (the V2 paper says 32; the script passes none)"),
        ("model.lora.dropout", 0.1, V2_CODE), ("model.lora.dora", True, V2_CODE),
        ("model.lora.init", "gaussian", V2_CODE),
        ("loss.name", "infonce", V2_CODE), ("loss.temperature", 0.02, V2_SCRIPT),
        ("data.train.task_batch_size", 8, V2_SCRIPT + ": interleave_batch_size 64 over 8 GPUs"),
        ("train.global_batch_size", 1024, V2_SCRIPT), ("train.chunk_size", 8, V2_SCRIPT),
        ("train.lr", 5e-5, V2_SCRIPT), ("train.schedule", "linear", V2_SCRIPT),
        ("train.warmup", 0.02, V2_SCRIPT + ": 100 of 5000"), ("trainer.max_steps", 5000, V2_SCRIPT),
    ],
}
#: the MMEB overall each paper recipe reproduces (LLaVE arXiv 2503.04812; VLM2Vec arXiv 2410.05160 /
#: leaderboard; VLM2Vec-V2 image part)
PAPER_SCORES = {"llave_0.5b": 59.1, "llave_2b": 65.2, "llave_7b": 70.3, "vlm2vec_phi35v_4b": 60.1,
                "vlm2vec_qwen2vl_2b": 59.3, "vlm2vec_qwen2vl_7b": 65.8, "vlm2vec_v2_qwen2vl_2b": 64.9}
BEYOND = ["llave_7b_gradcache", "vlm2vec_qwen2vl_2b_hw", "llave_2b_mined"]


def _get(cfg: dict, key: str):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def test_every_paper_and_beyond_recipe_is_shipped():
    assert set(SOURCED) | set(BEYOND) <= set(available_recipes())


@pytest.mark.parametrize("name", list(SOURCED))
def test_recipe_matches_its_sources(name):
    cfg = compose([f"recipe={name}"])
    wrong = [f"{key}={_get(cfg, key)!r}, source says {value!r} ({source})"
             for key, value, source in SOURCED[name] if _get(cfg, key) != value]
    assert not wrong, "\n".join(wrong)
    assert cfg["paper"]["mmeb"] == PAPER_SCORES[name]


@pytest.mark.parametrize("name", BEYOND)
def test_beyond_paper_recipes_claim_no_score(name):
    assert compose([f"recipe={name}"])["paper"]["mmeb"] is None


def test_llave_gradcache_contrasts_1024_at_once():
    cfg = compose(["recipe=llave_7b_gradcache"])
    assert cfg["train"]["global_batch_size"] == 1024 and cfg["train"]["accumulate_steps"] == 1
    assert cfg["train"]["lr"] == 5e-6 and cfg["loss"]["name"] == "hardness_weighted"


def test_llave_2b_mined_is_llave_2b_with_mined_negatives_and_masking():
    base, mined = compose(["recipe=llave_2b"]), compose(["recipe=llave_2b_mined"])
    assert mined["data"]["train"]["num_negatives"] == 4 and mined["train"]["mask_duplicates"] is True
    assert mined["loss"] == base["loss"] and mined["loss"]["name"] == "hardness_weighted"
    assert base["train"]["mask_duplicates"] is False  # the paper recipes do not mask (the papers did not)


# -- every shipped recipe trains 2 steps with its family's tiny model ---------------------------------
#: per family, what shrinks to test size (resolution bounds only; the keys a recipe sets stay)
TINY = {
    "qwen2_vl": ["model.backbone.min_pixels=3136", "model.backbone.max_pixels=12544"],
    # and the Matryoshka dims, which the tiny model's 64-d embedding must hold
    "qwen3_vl": ["model.backbone.min_pixels=1024", "model.backbone.max_pixels=16384", "loss.dims=[64,32]"],
    "llava_onevision": [],
    "phi3_v": [],
    "hf_text": [],
    "qwen2_5_vl": ["model.backbone.min_pixels=3136", "model.backbone.max_pixels=12544"],
}
#: per recipe, what else shrinks (Matryoshka dims that fit the tiny model's 64 dimensions)
TINY_RECIPE = {"jina_v4": ["loss.dims=[16,32,64]"]}


def _examples(n: int) -> list[Example]:
    colours = ["red", "green", "blue", "yellow"]
    out = []
    for i in range(n):
        img = Image.new("RGB", (40 + 8 * i, 32), colours[i % 4])
        query = Item(text=f"<|image_1|>\nfind the {colours[i % 4]} image", image=img) if i % 2 else \
            Item(text=f"a {colours[i % 4]} square")
        out.append(Example(query=query, positive=Item(text=f"{colours[i % 4]} square {i}", image=img)))
    return out


def _write_shard(folder, n: int) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "train-000000.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            data = json.dumps({"i": i}).encode()
            info = tarfile.TarInfo(f"{i:06d}.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.mark.parametrize("name", available_recipes())
def test_recipe_trains_two_steps_tiny(name, tmp_path):
    from embedkit.training.module import EmbeddingModule

    raw = compose([f"recipe={name}"])
    family = raw["model"]["backbone"]["name"]
    overrides = [f"recipe={name}", "model.backbone.tiny=true", "train.global_batch_size=4", "train.chunk_size=2",
                 "model.backbone.gradient_checkpointing=false", *TINY[family],
                 *TINY_RECIPE.get(name, [])]
    if raw["model"]["backbone"]["path"] is not None:
        overrides.append("~model.backbone.path")
    cfg = compose(overrides)
    module = EmbeddingModule.from_config(cfg)
    backbone = module.encoder.backbone
    if cfg["model"]["lora"]["vision"]:  # the vision tower carries trainable adapters
        vision = tuple(backbone.vision_prefixes)
        assert any(n.startswith(vision) and "lora_" in n and p.requires_grad for n, p in backbone.named_parameters())
    # the run length as fit derives it: epochs over a 16-example shard at the recipe's examples per step
    shard = _write_shard(tmp_path / "subset", 16 * cfg["train"]["accumulate_steps"])
    steps = total_steps(cfg["trainer"]["max_steps"], cfg["trainer"]["max_epochs"], [shard],
                        cfg["train"]["global_batch_size"] * module.accumulate)
    assert steps == (4 if cfg["trainer"]["max_epochs"] else cfg["trainer"]["max_steps"])
    opt = build_optimizer(module.parameters(), cfg["train"])
    sched = build_scheduler(opt, cfg["train"], steps)
    collate = ChunkCollate(module.encoder.processor(), cfg["train"]["chunk_size"], cfg["data"]["train"]["num_negatives"])
    text_only = family == "hf_text" or cfg["data"]["demo"]["text_only"]
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    for _ in range(2):
        examples = _examples(4)
        if text_only:
            examples = [Example(Item(text=e.query.text.replace("<|image_1|>\n", "")), Item(text=e.positive.text))
                        for e in examples]
        batch = collate(examples)
        assert len(batch.query_chunks) == 2  # GradCache over 2 chunks
        opt.zero_grad(set_to_none=True)
        out = module.backward_batch(batch, lambda t: t.backward())
        assert torch.isfinite(out.loss)
        opt.step()
        sched.step()
    changed = [n for n, p in module.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed


# -- the keys the recipes need ------------------------------------------------------------------------
def test_chat_template_pools_the_final_newline_llave():
    """LLaVE pools the last non-pad token of <|im_start|>assistant\\n\\n<|im_end|>\\n: the final "\\n"."""
    from embedkit.backbones.llava_onevision import LlavaOnevision

    b = LlavaOnevision(seed=0, tiny=True, prompt="chat", append_eos=False)
    tok = b.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in ["<|im_start|>", "<|im_end|>", "\n"]}
    items = [Item(text="a red circle"), Item(text="<|image_1|>\nfind the image", image=Image.new("RGB", (40, 30)))]
    out = b.make_processor()(items)
    for row, mask in zip(out["input_ids"], out["attention_mask"]):
        seq = row[mask.bool()].tolist()
        assert seq[0] == ids["<|im_start|>"]
        assistant = tok("assistant", add_special_tokens=False)["input_ids"]
        nl, end, start = ids["\n"], ids["<|im_end|>"], ids["<|im_start|>"]
        assert seq[-(len(assistant) + 7):] == [end, nl, start, *assistant, nl, nl, end, nl]
        assert seq.count(start) == 3 and seq.count(end) == 3
        # last-token pooling reads attention_mask.sum - 1, i.e. that final "\n"
        assert row[int(mask.sum()) - 1].item() == nl
    with pytest.raises(ConfigError, match="append_eos"):
        compose(["model.backbone.name=llava_onevision", "model.backbone.tiny=true", "model.backbone.prompt=chat"])


def test_linear_schedule_values():
    total, warmup = 100, 10
    assert lr_multiplier(0, total, warmup, 0.0, "linear") == pytest.approx(0.1)
    assert lr_multiplier(warmup - 1, total, warmup, 0.0, "linear") == pytest.approx(1.0)  # warm-up end
    assert lr_multiplier(warmup, total, warmup, 0.0, "linear") == pytest.approx(1.0)
    assert lr_multiplier(55, total, warmup, 0.0, "linear") == pytest.approx(0.5)
    assert lr_multiplier(total, total, warmup, 0.0, "linear") == pytest.approx(0.0)  # the end
    assert lr_multiplier(total, total, warmup, 0.1, "linear") == pytest.approx(0.1)
    assert lr_multiplier(55, total, warmup, 0.0, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(99, total, warmup, 0.0, "constant") == 1.0
    # through the scheduler the optimizer actually sees
    param = torch.nn.Parameter(torch.zeros(1))
    train = {"optimizer": "adamw", "lr": 2e-5, "betas": [0.9, 0.999], "weight_decay": 0.0,
             "warmup": 0.1, "min_lr_ratio": 0.0, "schedule": "linear"}
    opt = build_optimizer([param], train)
    sched = build_scheduler(opt, train, total)
    lrs = []
    for _ in range(total + 1):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(2e-6) and lrs[9] == pytest.approx(2e-5) and lrs[100] == pytest.approx(0.0)


def test_schedule_key_is_validated():
    with pytest.raises(ConfigError, match="train.schedule"):
        compose(["train.schedule=step"])


def test_max_epochs_steps_from_manifest_and_shards(tmp_path):
    shard = _write_shard(tmp_path / "root" / "a", 10)  # no manifest: counts tar samples
    assert total_steps(7, 0, [shard], 4) == 7  # epochs off: max_steps
    assert total_steps(7, 1, [shard], 4) == 2  # 10 // 4, last step dropped
    assert total_steps(7, 3, [shard], 4) == 7  # 30 // 4
    (tmp_path / "root" / "manifest.json").write_text(json.dumps({"subsets": {"a": {"count": 662_000}}}))
    assert total_steps(7, 1, [shard], 256) == 662_000 // 256  # LLaVE: ~2.59K steps
    with pytest.raises(UserError, match="trainer.max_epochs"):
        total_steps(7, 1, [_write_shard(tmp_path / "b", 3)], 4)


def test_lora_vision_targets_need_the_vision_key():
    from embedkit.backbones.lora import apply_lora
    from embedkit.backbones.phi3_v import Phi3V

    target = r"^.*\.(qkv_proj|o_proj|gate_up_proj|down_proj|k_proj|q_proj|out_proj|v_proj)$"
    cfg = {"enabled": True, "r": 8, "alpha": 64, "dropout": 0.1, "dora": False, "target": target,
           "vision": False, "init": "gaussian"}
    with pytest.raises(ConfigError, match="model.lora.vision=true"):
        apply_lora(Phi3V(seed=0, tiny=True), cfg)
    b = apply_lora(Phi3V(seed=0, tiny=True), {**cfg, "vision": True})
    names = [n for n, m in b.named_modules() if hasattr(m, "lora_A")]
    assert any(n.startswith("vision_tower.") for n in names) and any(n.startswith("language_model.") for n in names)
    b_weights = [p for n, p in b.named_parameters() if "lora_B" in n]
    assert all(torch.count_nonzero(p) == 0 for p in b_weights)  # gaussian init: B zero, A ~ N(0, 1/r)
    a = torch.cat([p.flatten() for n, p in b.named_parameters() if "lora_A" in n])
    assert a.std().item() == pytest.approx(1 / 8, rel=0.2)


def test_qwen2_vl_append_eos_and_resize():
    from embedkit.backbones.qwen2_vl import Qwen2VLBackbone

    kw = dict(seed=0, tiny=True, min_pixels=3136, max_pixels=12544)
    plain = Qwen2VLBackbone(**kw, append_eos=False, resize=[56, 56]).make_processor()
    eos = Qwen2VLBackbone(**kw).make_processor()
    item = Item(text="a red square")
    assert eos([item])["input_ids"][0, -1].item() == eos.tokenizer.eos_token_id
    assert plain([item])["input_ids"][0, -1].item() != plain.tokenizer.eos_token_id
    small, wide = Item(image=Image.new("RGB", (30, 20))), Item(image=Image.new("RGB", (100, 50)))
    grids = [plain([it])["image_grid_thw"].tolist() for it in (small, wide)]
    assert grids[0] == grids[1] == [[1, 4, 4]]  # both pre-resized to 56 x 56
    assert plain.num_tokens(wide) == plain([wide])["input_ids"].shape[1]


def test_phi3_v_max_length_cuts_text_only():
    from embedkit.backbones.phi3_v import Phi3V

    proc = Phi3V(seed=0, tiny=True, append_eos=False, max_length=3).make_processor()
    assert proc([Item(text="a red square on the left")])["input_ids"].shape[1] == 3


def test_recipes_command_prints_the_table(capsys):
    from embedkit.cli import main as cli_main

    assert cli_main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = {line.split()[0]: line for line in lines[1:]}
    assert "70.3" in table["llave_7b"] and "32 / 256" in table["llave_7b"] and "1 epoch" in table["llave_7b"]
    assert "DoRA r=8 +vision" in table["vlm2vec_phi35v_4b"] and "60.1" in table["vlm2vec_phi35v_4b"]
    assert table["llave_7b_gradcache"].rstrip().endswith("-")
