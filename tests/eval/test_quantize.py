"""Binary and int8 embeddings (32 and 4 times smaller than float32): codes and scores against direct
implementations, the MMEB protocol's quantised table, and ``embedkit encode quantize=``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedkit.eval import mmeb, quantize  # noqa: E402
from tests.helpers import mmeb_fixture as fx  # noqa: E402


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dim", [64, 13])
def test_binary_codes_and_hamming_equal_direct_implementations(dim):
    x, y = rand(7, dim), rand(5, dim, seed=1)
    codes = quantize.binarize(x)
    assert codes.dtype == torch.uint8 and codes.shape == (7, -(-dim // 8))
    assert np.array_equal(codes.numpy(), np.packbits((x > 0).numpy(), axis=1))  # numpy's bit order
    ham = quantize.hamming(codes[:, None], quantize.binarize(y)[None])
    direct = ((x > 0)[:, None] != (y > 0)[None]).sum(-1)
    assert torch.equal(ham, direct)
    signs = quantize.unpack_signs(codes, dim)
    assert torch.equal(signs, torch.where(x > 0, 1.0, -1.0))
    ys = torch.where(y > 0, 1.0, -1.0)
    assert torch.equal((dim - 2 * ham).float(), signs @ ys.T)  # D - 2 ham = <2b_q - 1, 2b_c - 1>


def test_int8_equals_the_direct_formula():
    c, q = rand(50, 16), rand(4, 16, seed=1) * 1.5  # queries outside the candidates' range get clamped
    ranges = quantize.int8_ranges(c)
    codes = quantize.int8_quantize(q, ranges)
    for i in range(q.shape[0]):
        for j in range(q.shape[1]):
            lo, hi = float(c[:, j].min()), float(c[:, j].max())
            want = max(-128, min(127, round((float(q[i, j]) - lo) / ((hi - lo) / 255)) - 128))
            assert int(codes[i, j]) == want
    back = quantize.int8_dequantize(quantize.int8_quantize(c, ranges), ranges)
    step = (ranges[1] - ranges[0]) / 255
    assert ((back - c).abs() <= step / 2 + 1e-6).all()  # within half a step inside the range
    assert quantize.bytes_per_vector("int8", 16) == 16 and quantize.bytes_per_vector("binary", 13) == 2


def rows_layout(n_rows=6, width=9, n_c=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    q_index = [int(i) for i in torch.randint(0, 8, (n_rows,), generator=g)]
    c_index = [torch.randperm(n_c, generator=g)[: width - (r % 3)].tolist() for r in range(n_rows)]
    return q_index, c_index


def test_quantized_row_scores_equal_direct_scoring():
    dim = 24
    q, c = rand(8, dim), rand(30, dim, seed=1)
    q_index, c_index = rows_layout()
    qn, cn = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(c, dim=-1)
    ranges = quantize.int8_ranges(cn)
    dq = quantize.int8_dequantize(quantize.int8_quantize(qn, ranges), ranges)
    dc = quantize.int8_dequantize(quantize.int8_quantize(cn, ranges), ranges)
    got = {m: quantize.quantized_row_scores(q, c, q_index, c_index, m) for m in ("int8", "binary")}
    resc = quantize.quantized_row_scores(q, c, q_index, c_index, "binary", rescore=True, rescore_k=3)
    for r, (qi, ci) in enumerate(zip(q_index, c_index)):
        n = len(ci)
        assert torch.isinf(got["int8"][r, n:]).all() and torch.isinf(resc[r, n:]).all()
        torch.testing.assert_close(got["int8"][r, :n], dc[ci] @ dq[qi], atol=1e-6, rtol=0)
        ham = torch.tensor([int(((qn[qi] > 0) != (cn[j] > 0)).sum()) for j in ci])
        assert torch.equal(got["binary"][r, :n], (dim - 2 * ham).float())
        # rescoring: the 3 nearest by Hamming come first, ordered by <q, sign(c)>; then the rest by Hamming
        order = resc[r, :n].argsort(descending=True).tolist()
        top = set(order[:3])
        assert max(ham[list(top)]) <= min(ham[[k for k in range(n) if k not in top]])
        fine = torch.where(cn[ci] > 0, 1.0, -1.0) @ qn[qi]
        assert order[:3] == sorted(top, key=lambda k: -float(fine[k]))
        torch.testing.assert_close(resc[r, order[:3]], fine[order[:3]], atol=1e-6, rtol=0)


def noisy_encoder(items, dim=64):
    """Each class a fixed random direction, each item its own noise: float ranks well, binary worse."""
    centres = rand(fx.NUM_CLASSES, dim, seed=7)
    return torch.stack([centres[fx.item_class(it)] for it in items]) + 1.1 * fx.scrambled_encoder(items, dim)


def test_eval_reports_p1_next_to_bytes_per_vector(tmp_path):
    root = tmp_path / "mmeb"
    fx.build(root)
    summary = mmeb.evaluate(root, ["N24News", "RefCOCO"], noisy_encoder, quantize=["int8", "binary"], rescore_k=4,
                            out_dir=tmp_path / "out")
    for r in summary["datasets"].values():
        qz = r["quantized"]
        assert list(qz) == ["float", "int8", "binary", "binary_rescore"]
        assert qz["float"]["acc"] == r["acc"]
        assert [qz[m]["bytes_per_vector"] for m in qz] == [256, 64, 8, 8]
        assert all(0.0 <= qz[m]["acc"] <= 1.0 for m in qz)
        assert abs(qz["int8"]["acc"] - r["acc"]) <= 0.05  # int8 barely moves the ranking
    table = (tmp_path / "out" / "summary.md").read_text()
    assert "| scoring | bytes/vector | N24News | RefCOCO | mean P@1 | ties at top |" in table
    assert "| binary_rescore | 8 |" in table and "| float | 256 |" in table
    metrics = mmeb.metric_items(summary)
    assert metrics["eval/N24News/p@1/binary"] == summary["datasets"]["N24News"]["quantized"]["binary"]["acc"]


def test_quantize_cli_errors_are_one_line(tmp_path, capsys):
    from embedkit.cli import main as cli

    root = tmp_path / "mmeb"
    fx.build(root)
    for words, msg in ((["quantize=int4"], "quantize: expected one of binary, int8, or a list of them"),
                       (["quantize=int8", "rescore=true"], "rescore: rescoring applies to binary codes"),
                       (["quantize=binary", "rescore_k=0"], "rescore_k: must be >= 1")):
        assert cli(["eval", "ckpt=x.ckpt", f"data.eval.root={root}", *words]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and msg in err
    assert cli(["encode", "model=x", "input=a.jsonl", "out=b.npy", "quantize=pq"]) == 2
    assert "quantize: expected one of binary, int8, got 'pq'" in capsys.readouterr().err


class FakeEncoder:
    def encode_items(self, items, batch_size=32, dim=None, **batching):
        return torch.stack([rand(20, seed=len(it.text) * 31 + i) for i, it in enumerate(items)])


@pytest.mark.parametrize("mode", ["binary", "int8"])
def test_encode_writes_quantized_codes(mode, tmp_path):
    from embedkit.export.corpus import encode_file

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(f'{{"text": "row {"x" * i}"}}' for i in range(7)) + "\n")
    encode_file(FakeEncoder(), corpus, tmp_path / "float.npy", part_size=3, log=lambda m: None)
    encode_file(FakeEncoder(), corpus, tmp_path / "q.npy", part_size=3, log=lambda m: None, quantize=mode)
    x, codes = torch.from_numpy(np.load(tmp_path / "float.npy")), np.load(tmp_path / "q.npy")
    if mode == "binary":
        assert codes.dtype == np.uint8 and np.array_equal(codes, np.packbits(x.numpy() > 0, axis=1))
    else:
        ranges = np.load(tmp_path / "q.npy.int8-ranges.npy")
        assert codes.dtype == np.int8 and np.allclose(ranges, quantize.int8_ranges(x).numpy())
        assert np.array_equal(codes, quantize.int8_quantize(x, torch.from_numpy(ranges)).numpy())


def test_quantize_is_refused_for_token_vector_sets():
    from embedkit.config.loader import compose
    from embedkit.encoder import Encoder
    from embedkit.errors import UserError

    cfg = compose(["recipe=demo", "model.backbone.tiny=true"])
    single = Encoder.from_config(cfg["model"], seed=0)
    quantize.check_quantizable(single, ["binary", "int8"])  # one vector per input: fine
    multi = Encoder.from_config(compose(["recipe=demo", "model.backbone.tiny=true", "model.pooling=multi_vector"])["model"], seed=0)
    quantize.check_quantizable(multi, [])  # nothing asked
    with pytest.raises(UserError, match="token-vector sets"):
        quantize.check_quantizable(multi, ["binary"])
