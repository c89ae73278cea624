"""The sentence-transformers side of an export, and what ST does not do that embedkit does.

sentence-transformers reads ``modules.json`` (Transformer -> Pooling -> Normalize),
``sentence_bert_config.json``, ``config_sentence_transformers.json`` (prompts, similarity) and each
module's folder. Two things embedkit does that ST does not are baked into the saved files:

- text backbones append the tokenizer's EOS (the state last-token pooling reads); ST never appends
  one, so the saved tokenizer's post-processor appends it (``bake_eos``);
- VLM backbones build one input string (image tokens, then the text, then EOS); ST's multimodal
  path renders messages through the chat template, so the saved one renders exactly that string
  (``CHAT_TEMPLATES``), and ``modality_config`` routes text, image and message inputs to ``forward``.

Heads ST has no pooling mode for (``latent_attention``, ``multi_layer``) get the custom module
``embedkit.export.st_module.EmbedkitPooling`` (``1_EmbedkitPooling/``; loading it needs
``trust_remote_code=True`` in sentence-transformers 6); a head that reads every layer also sets
``config_kwargs.output_hidden_states`` so ST's Transformer hands ``all_layer_embeddings`` on.
"""

from __future__ import annotations

import json
from pathlib import Path

#: pooling heads ST has built in: embedkit name -> ST ``pooling_mode`` (legacy boolean key too)
ST_POOLING = {"last_token": ("lasttoken", "pooling_mode_lasttoken"), "mean": ("mean", "pooling_mode_mean_tokens")}
LEGACY_POOLING_KEYS = ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens",
                       "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens",
                       "pooling_mode_lasttoken")

#: chat templates rendering a message list as embedkit's processor input string (before image
#: tokens are expanded by the processor): each message's parts in order, images as the family's
#: image marker, then EOS
CHAT_TEMPLATES = {
    "qwen2_vl": (
        "{%- for message in messages -%}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}<|vision_start|><|image_pad|><|vision_end|>"
        "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}{%- endfor -%}{{ eos_token }}"
    ),
    # LLaVA-OneVision and Phi-3.5-V: the image marker (one ``<image>`` / ``<|image_1|>``, which the
    # stock processors expand into the image's tokens), a newline before text that follows an image,
    # then EOS; embedkit's one image per item is the message's first image
    "llava_onevision": (
        "{%- for message in messages -%}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}<image>"
        "{%- elif part['type'] == 'text' -%}"
        "{%- if not loop.first and loop.previtem['type'] == 'image' -%}{{ '\\n' }}{%- endif -%}{{ part['text'] }}"
        "{%- endif -%}"
        "{%- endfor -%}{%- endif -%}{%- endfor -%}{{ eos_token }}"
    ),
    "phi3_v": (
        "{%- for message in messages -%}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}<|image_1|>"
        "{%- elif part['type'] == 'text' -%}"
        "{%- if not loop.first and loop.previtem['type'] == 'image' -%}{{ '\\n' }}{%- endif -%}{{ part['text'] }}"
        "{%- endif -%}"
        "{%- endfor -%}{%- endif -%}{%- endfor -%}{{ eos_token }}"
    ),
}
VLM_FAMILIES = ("qwen2_vl", "llava_onevision", "phi3_v", "qwen3_vl")


#: the families whose ``prompt: chat`` layout the export writes as a chat template with the generation prompt
CHAT_LAYOUT_FAMILIES = ("qwen2_vl", "qwen3_vl")


def qwen3_vl_chat_template(system: str, end: str) -> str:
    """The chat template of a ``prompt: chat`` export (Qwen3-VL-Embedding; GME on qwen2_vl, the same frame):
    what ``apply_chat_template(add_generation_prompt=True)`` renders for the reference embedder (research note
    qwen-vl-backbones.md sec. 1.2, 1.5; GME: gme_inference.py), then ``end`` (the appended ``<|endoftext|>``,
    unless the tokenizer appends it itself)::

        <|im_start|>system\n{system message, else ``system``}<|im_end|>\n<|im_start|>user\n{images}{texts}
        <|im_end|>\n<|im_start|>assistant\n{end}

    sentence-transformers sends a prompt as a system message (``prepend_prompt_to_messages``): a query's
    instruction; without one the template's default ``system`` (the documents' message). The user turn
    puts every image before the text, as embedkit's processor (``schema.segments``) and the reference do."""
    nl = "{{ '\\n' }}"
    return (
        "{%- set ns = namespace(system=" + json.dumps(system) + ") -%}"
        "{%- for message in messages if message['role'] == 'system' -%}"
        "{%- if message['content'] is string -%}{%- set ns.system = message['content'] -%}"
        "{%- else -%}{%- set ns.system = message['content'] | selectattr('type', 'equalto', 'text') "
        "| map(attribute='text') | join('') -%}{%- endif -%}{%- endfor -%}"
        "<|im_start|>system" + nl + "{{ ns.system }}<|im_end|>" + nl + "<|im_start|>user" + nl +
        "{%- for message in messages if message['role'] != 'system' -%}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}"
        "{%- for part in message['content'] if part['type'] == 'image' -%}"
        "<|vision_start|><|image_pad|><|vision_end|>{%- endfor -%}"
        "{%- for part in message['content'] if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
        "{%- endif -%}{%- endfor -%}"
        "<|im_end|>" + nl + "{%- if add_generation_prompt -%}<|im_start|>assistant" + nl + "{%- endif -%}"
        + end.replace("{", "{{ '{' }}")
    )


def unsupported(model: dict) -> str | None:
    """Why the sentence-transformers files could not reproduce embedkit's input for this model section (one
    line), None when they can: the saved chat templates render the default layout only (no ``prompt`` frame,
    no ``append_token``), and the Qwen2.5-VL / Qwen3-VL families have no template here yet."""
    backbone = model["backbone"]
    family = backbone["name"]
    if family == "qwen3_vl":
        return _chat_layout_unsupported(backbone)
    if family == "qwen2_5_vl":
        return f"no sentence-transformers layout for the {family} family yet"
    if family == "qwen2_vl" and backbone.get("prompt") == "chat":  # GME's layout: the chat template below
        return _chat_layout_unsupported(backbone)
    if backbone.get("prompt", "none") not in ("none", None) and family == "qwen2_vl":
        return f"the saved chat template does not render model.backbone.prompt={backbone['prompt']}"
    if backbone.get("append_token") is not None:
        return f"the saved tokenizer does not append model.backbone.append_token={backbone['append_token']}"
    pooling = model.get("pooling") or {}
    if isinstance(pooling, dict) and pooling.get("span", "all") != "all":
        return f"sentence-transformers' pooling has no mode for model.pooling.span={pooling['span']}"
    return None


def _chat_layout_unsupported(backbone: dict) -> str | None:
    """qwen3_vl: only Qwen3-VL-Embedding's layout (``prompt: chat``) is written; qwen2_vl's ``prompt: chat``
    (GME) the same way. Images and text: the template renders no video."""
    if backbone.get("prompt", "none") != "chat":
        return "the qwen3_vl family's sentence-transformers layout is Qwen3-VL-Embedding's (model.backbone.prompt=chat)"
    if backbone.get("resize"):
        return "sentence-transformers' image processor does not apply model.backbone.resize"
    return None


def prepare_tokenizer(backbone, family: str) -> None:
    """Before saving: right padding (what embedkit's processors use) and the family's chat template (qwen3_vl
    in the chat layout: ``qwen3_vl_chat_template`` with the documents' system message and the appended token)."""
    tokenizer = backbone.tokenizer
    tokenizer.padding_side = "right"
    if family in CHAT_TEMPLATES:
        tokenizer.chat_template = CHAT_TEMPLATES[family]
    if family in CHAT_LAYOUT_FAMILIES and getattr(backbone, "system", None) is not None:
        system = backbone.candidate_system or backbone.system
        tokenizer.chat_template = qwen3_vl_chat_template(system, _template_end(backbone))


def _template_end(backbone) -> str:
    """The token embedkit appends (``append_token``, else EOS; none without ``append_eos``), unless the
    tokenizer appends it itself when sentence-transformers' processor tokenizes (special tokens on)."""
    tokenizer = backbone.tokenizer
    end = (backbone.append_token or tokenizer.eos_token) if backbone.append_eos else ""
    ids = tokenizer("a")["input_ids"]
    if end and ids and ids[-1] == tokenizer.convert_tokens_to_ids(end):
        return ""
    return end


def st_prompts(meta: dict, encoder) -> dict:
    """``config_sentence_transformers.json``'s prompts: the export's (text prefixes); for a qwen3_vl chat
    export, the query side's system message as prompt ``query`` where it differs from the documents' (the
    template's default): sentence-transformers sends a prompt as the system message."""
    backbone = encoder.backbone
    if meta["model"]["backbone"]["name"] not in CHAT_LAYOUT_FAMILIES or getattr(backbone, "system", None) is None:
        return meta["prompts"]
    default = backbone.candidate_system or backbone.system
    return {"query": backbone.system} if backbone.system != default else {}


def appends_eos(backbone, family: str) -> bool:
    """Does embedkit append an EOS that the tokenizer itself does not add (text backbones)?"""
    tok = backbone.tokenizer
    if family != "hf_text" or not getattr(backbone, "append_eos", False) or tok.eos_token_id is None:
        return False
    ids = tok("a")["input_ids"]
    return not ids or ids[-1] != tok.eos_token_id


def bake_eos(folder: Path, backbone, family: str) -> None:
    """Make the saved ``tokenizer.json`` append EOS after every sequence (as embedkit does)."""
    if not appends_eos(backbone, family) or not (folder / "tokenizer.json").is_file():
        return
    from tokenizers import Tokenizer, processors

    tok = backbone.tokenizer
    eos, eos_id = tok.eos_token, tok.eos_token_id
    fast = Tokenizer.from_file(str(folder / "tokenizer.json"))
    template = processors.TemplateProcessing(single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, eos_id)])
    existing = fast.post_processor
    fast.post_processor = template if existing is None else processors.Sequence([existing, template])
    fast.save(str(folder / "tokenizer.json"))


def write(folder: Path, meta: dict, encoder) -> None:
    """modules.json, config_sentence_transformers.json, sentence_bert_config.json, the pooling and
    normalisation modules."""
    model = meta["model"]
    family, head = model["backbone"]["name"], model["pooling"]["name"]
    dim = meta["embedding_dim"]
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.transformer.Transformer"}]
    if head in ST_POOLING:
        mode, legacy = ST_POOLING[head]
        pool = {"embedding_dimension": dim, "pooling_mode": mode, "include_prompt": True,
                "word_embedding_dimension": dim, **{k: k == legacy for k in LEGACY_POOLING_KEYS}}
        modules.append({"idx": 1, "name": "1", "path": "1_Pooling",
                        "type": "sentence_transformers.sentence_transformer.modules.pooling.Pooling"})
        dump(folder / "1_Pooling" / "config.json", pool)
    else:
        # a head ST lacks: a custom module that imports from embedkit (embedkit must be installed)
        modules.append({"idx": 1, "name": "1", "path": "1_EmbedkitPooling",
                        "type": "embedkit.export.st_module.EmbedkitPooling"})
        dump(folder / "1_EmbedkitPooling" / "config.json", {
            "pooling": model["pooling"], "embedding_dimension": dim,
            "hidden_size": int(encoder.backbone.hidden_size), "num_layers": int(encoder.backbone.num_layers),
            "plugins": list(meta.get("plugins") or []),
        })
    if meta["normalize"]:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.base.modules.normalize.Normalize"})
        dump(folder / "2_Normalize" / "config.json",
             {"module_input_name": "sentence_embedding", "module_output_name": "sentence_embedding"})
    dump(folder / "modules.json", modules)
    forward = {"method": "forward", "method_output_name": "last_hidden_state"}
    bert = {"transformer_task": "feature-extraction", "module_output_name": "token_embeddings"}
    if family in CHAT_LAYOUT_FAMILIES and model["backbone"].get("prompt") == "chat":
        # Qwen3-VL-Embedding's ST config (research note sec. 1.5): the generation prompt (GME: the same frame)
        bert["processing_kwargs"] = {"chat_template": {"add_generation_prompt": True}}
    if family in VLM_FAMILIES:
        bert["modality_config"] = {"text": forward, "image": forward, ("message"): {**forward, "format": "structured"}}
        bert["unpad_inputs"] = False
    else:
        bert["modality_config"] = {"text": forward}
        bert["max_seq_length"] = int(model["backbone"].get("max_length") or getattr(encoder.backbone, "max_length", 512))
    if getattr(encoder.pooling, "needs_all_layers", False):
        # ST's Transformer hands every layer on (features["all_layer_embeddings"]) when the model
        # config asks the model for them
        bert["config_kwargs"] = {"output_hidden_states": True}
    dump(folder / "sentence_bert_config.json", bert)
    st_config = {
        "model_type": "SentenceTransformer",
        "prompts": st_prompts(meta, encoder),
        "default_prompt_name": None,
        "similarity_fn_name": "cosine" if meta["normalize"] else "dot",
    }
    if meta.get("dim"):  # export dim=: ST keeps the first dim coordinates (after its Normalize: cosine scores agree)
        st_config["truncate_dim"] = meta["dim"]
    dump(folder / "config_sentence_transformers.json", st_config)


def dump(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")
