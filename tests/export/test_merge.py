"""Model merging (runs of one base combined in weight space, no training): the formulas against direct implementations, runs of one base merged into
a run dir that eval, export and load read, and the refusals."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import embedkit  # noqa: E402
from embedkit.data.schema import Item  # noqa: E402
from embedkit.errors import UserError  # noqa: E402
from embedkit.export import merge  # noqa: E402
from embedkit.export.reader import from_checkpoint  # noqa: E402
from tests.helpers import mmeb_fixture as fx  # noqa: E402


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_average_is_the_weighted_arithmetic_mean():
    a, b, c = rand(5, 7), rand(5, 7, seed=1), rand(5, 7, seed=2)
    assert (merge.average([a, b], [1, 1]) - (a + b) / 2).abs().max() <= 1e-7
    torch.testing.assert_close(merge.average([a, b, c], [1, 2, 3]), (a + 2 * b + 3 * c) / 6, atol=1e-7, rtol=0)


def test_slerp_equals_the_direct_formula():
    a, b = rand(4, 6), rand(4, 6, seed=1)
    for t in (0.0, 0.3, 0.5, 1.0):
        x, y = a.flatten().tolist(), b.flatten().tolist()
        na, nb = math.sqrt(sum(v * v for v in x)), math.sqrt(sum(v * v for v in y))
        omega = math.acos(sum(p * q for p, q in zip(x, y)) / (na * nb))
        want = [math.sin((1 - t) * omega) / math.sin(omega) * p + math.sin(t * omega) / math.sin(omega) * q
                for p, q in zip(x, y)]
        torch.testing.assert_close(merge.slerp(a, b, t), torch.tensor(want).view(4, 6), atol=1e-6, rtol=0)
    # unit vectors stay on the sphere; parallel tensors (a frozen weight) fall back to linear interpolation
    u, v = a / a.norm(), b / b.norm()
    assert abs(float(merge.slerp(u, v, 0.4).norm()) - 1) <= 1e-6
    torch.testing.assert_close(merge.slerp(a, 2 * a, 0.5), 1.5 * a, atol=1e-6, rtol=0)


def direct_ties(base, tensors, weights, density, scale):
    flat_base = base.flatten().tolist()
    taus = []
    for t in tensors:
        tau = [x - y for x, y in zip(t.flatten().tolist(), flat_base)]
        k = math.ceil(density * len(tau))
        keep = sorted(range(len(tau)), key=lambda i: -abs(tau[i]))[:k]
        taus.append([tau[i] if i in keep else 0.0 for i in range(len(tau))])
    out = []
    for j in range(len(flat_base)):
        total = sum(tau[j] for tau in taus)
        sign = (total > 0) - (total < 0)
        pairs = [(w, tau[j]) for w, tau in zip(weights, taus) if tau[j] != 0 and ((tau[j] > 0) - (tau[j] < 0)) == sign]
        mean = sum(w * x for w, x in pairs) / sum(w for w, _ in pairs) if pairs else 0.0
        out.append(flat_base[j] + scale * mean)
    return torch.tensor(out).view_as(base)


@pytest.mark.parametrize("density,weights,scale", [(0.2, [1, 1, 1], 1.0), (0.5, [1, 2, 0.5], 0.7), (1.0, [1, 1, 1], 1.0)])
def test_ties_equals_a_direct_implementation(density, weights, scale):
    base = rand(6, 5, seed=9)
    tensors = [base + rand(6, 5, seed=s) for s in (1, 2, 3)]
    got = merge.ties(base, tensors, weights, density, scale)
    torch.testing.assert_close(got, direct_ties(base, tensors, weights, density, scale), atol=1e-6, rtol=0)


def test_ties_at_full_density_with_agreeing_signs_is_the_average():
    base = rand(3, 4)
    deltas = rand(3, 4, seed=1).abs()
    tensors = [base + deltas, base + 3 * deltas]
    torch.testing.assert_close(merge.ties(base, tensors, [1, 1], density=1.0), base + 2 * deltas, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- runs


def make_run(tmp: Path, name: str, overrides: list[str], seed: int) -> Path:
    """A run dir whose trainable weights moved off the base (as a short run would), by ``seed``."""
    from embedkit.config.loader import compose
    from embedkit.training.module import EmbeddingModule

    cfg = compose(["recipe=demo", "model.backbone.tiny_hidden_size=32", *overrides])
    module = EmbeddingModule.from_config(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    run = tmp / name
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": {"config": cfg}, "global_step": 3},
               run / "checkpoints" / "last.ckpt")
    return run


def folded(run: Path) -> dict:
    return merge.weight_space(run / "checkpoints" / "last.ckpt")[1]


def test_averaging_two_runs_is_the_mean_of_their_weights_and_the_merged_run_evaluates(tmp_path, capsys):
    from embedkit.cli import main as cli
    from embedkit.export.writer import export_model

    a, b = make_run(tmp_path, "a", [], 1), make_run(tmp_path, "b", [], 2)
    out = tmp_path / "merged"
    assert cli(["merge", str(a), str(b), f"out={out}"]) == 0
    assert "merge: wrote" in capsys.readouterr().out
    sa, sb = folded(a), folded(b)
    merged = from_checkpoint(out / "checkpoints" / "last.ckpt")
    moved = 0
    for key, value in merged.state_dict().items():
        mean = (sa[key] + sb[key]) / 2 if value.is_floating_point() else sa[key]
        assert (value - mean).abs().max() <= 1e-7, key
        moved += int(not torch.equal(sa[key], sb[key]))
    assert moved > 10  # the runs really differ
    # the merged run dir is read by eval, export and load
    root = tmp_path / "mmeb"
    fx.build(root)
    assert cli(["eval", f"ckpt={out / 'checkpoints' / 'last.ckpt'}", f"data.eval.root={root}",
                "data.eval.datasets=[RefCOCO]", "tracking.enabled=false", "quantize=binary", "rescore=true"]) == 0
    printed = capsys.readouterr().out
    assert "overall P@1" in printed and "| binary_rescore |" in printed
    items = [Item(text="object 1"), Item(text="object 7")]
    ref = merged.encode(items)
    assert (embedkit.load(out).encode(items) - ref).abs().max() <= 1e-6
    export = export_model(out, tmp_path / "export", log=lambda m: None)
    assert (embedkit.load(export).encode(items) - ref).abs().max() <= 1e-5


def test_lora_runs_merge_in_weight_space(tmp_path):
    lora = ["model.lora.enabled=true"]
    a, b = make_run(tmp_path, "a", lora, 1), make_run(tmp_path, "b", lora, 2)
    out = merge.merge_runs([a, b], tmp_path / "merged", method="slerp", weights=[1, 1], log=lambda m: None)
    merged = from_checkpoint(out / "checkpoints" / "last.ckpt")
    assert merged.provenance.config["model"]["lora"]["enabled"] is False
    sa, sb = folded(a), folded(b)
    assert any(not torch.equal(sa[k], sb[k]) for k in sa)
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(value, merge.slerp(sa[key], sb[key], 0.5), atol=1e-7, rtol=0)
    # ties: the base is the frozen weights the LoRA checkpoints carry
    out = merge.merge_runs([a, b], tmp_path / "ties", method="ties", density=0.5, log=lambda m: None)
    base = merge.weight_space(a / "checkpoints" / "last.ckpt")[2]
    merged = from_checkpoint(out / "checkpoints" / "last.ckpt").state_dict()
    key = next(k for k in merged if "q_proj" in k and k.endswith("weight"))
    torch.testing.assert_close(merged[key], merge.ties(base[key], [sa[key], sb[key]], [1, 1], 0.5), atol=1e-7, rtol=0)


def test_refusals_are_one_line(tmp_path, capsys):
    from embedkit.cli import main as cli

    a = make_run(tmp_path, "a", [], 1)
    b = make_run(tmp_path, "b", ["model.pooling=mean"], 2)
    with pytest.raises(UserError, match=r"differs from .* in model\.pooling\.name \('mean' vs 'last_token'\)"):
        merge.merge_runs([a, b], tmp_path / "m", log=lambda m: None)
    c = make_run(tmp_path, "c", ["seed=5"], 2)
    with pytest.raises(UserError, match="in seed"):
        merge.merge_runs([a, c], tmp_path / "m", log=lambda m: None)
    for words, msg in ((["method=soup"], "method: expected one of average, slerp, ties, got 'soup'"),
                       (["weights=[1]"], "weights: 1 weights for 2 runs"),
                       (["weights=x"], "weights: expected a list of numbers"),
                       ([], "merge: give out=DIR")):
        outs = [] if not words and msg.startswith("merge: give") else [f"out={tmp_path / 'm'}"]
        assert cli(["merge", str(a), str(a), *outs, *words]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and msg in err, err
    assert cli(["merge", str(a), str(a), str(a), f"out={tmp_path / 'm'}", "method=slerp"]) == 2
    assert "slerp merges exactly two runs" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
