"""MUVERA fixed-dimensional encodings (arXiv 2405.19588: multi-vector search by single-vector inner
products): the encodings against direct loops over tokens and buckets, exact MaxSim, and the recall of
the exact top 10 on a synthetic corpus."""

from __future__ import annotations

import math

import pytest
import torch

from bench.muvera_corpus import clustered_corpus, recall_of_exact_top
from embedkit.eval.muvera import FDE, FDEConfig, MuveraIndex, maxsim


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def direct_fde(fde: FDE, x: torch.Tensor, mask: torch.Tensor, document: bool) -> torch.Tensor:
    """One set at a time, token by token, bucket by bucket, as the paper states it."""
    c = fde.config
    out = []
    tokens = [x[t] for t in range(x.shape[0]) if mask[t]]
    for r in range(c.repetitions):
        def code(v, r=r):
            return sum((1 << i) for i in range(c.k_sim) if float(fde.planes[r, i] @ v) > 0)

        def psi(v, r=r):
            return fde.proj[r] @ v if fde.proj is not None else v

        codes = [code(v) for v in tokens]
        for b in range(fde.buckets):
            members = [psi(v) for v, k in zip(tokens, codes) if k == b]
            if members:
                block = sum(members) / (len(members) if document else 1)
            elif document and c.fill_empty and c.k_sim > 0:
                dist = [bin(k ^ b).count("1") for k in codes]
                block = psi(tokens[dist.index(min(dist))])
            else:
                block = torch.zeros(fde.d_proj)
            out.append(block)
    flat = torch.cat(out)
    return fde.final @ flat if fde.final is not None else flat


@pytest.mark.parametrize("config", [
    FDEConfig(k_sim=2, d_proj=3, repetitions=2, seed=1),
    FDEConfig(k_sim=3, d_proj=None, repetitions=1, seed=2),
    FDEConfig(k_sim=2, d_proj=3, repetitions=2, final_dim=7, seed=3),
    FDEConfig(k_sim=2, d_proj=4, repetitions=3, fill_empty=False, seed=4),
])
def test_fde_equals_a_direct_loop(config):
    fde = FDE(5, config)
    x = rand(4, 6, 5)
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] + [0] * 5, [1] * 5 + [0]], dtype=torch.bool)
    x = x.masked_fill(~mask[..., None], 123.0)  # padding must never count
    q, d = fde.queries(x, mask), fde.documents(x, mask)
    assert q.shape == d.shape == (4, fde.width)
    for i in range(4):
        torch.testing.assert_close(q[i], direct_fde(fde, x[i], mask[i], document=False), atol=1e-6, rtol=0)
        torch.testing.assert_close(d[i], direct_fde(fde, x[i], mask[i], document=True), atol=1e-6, rtol=0)


def test_one_bucket_without_projection_is_the_sum_against_the_mean():
    """k_sim = 0, no projection: <F(Q), F(P)> = sum_q <q, mean(P)> (a sanity anchor for the blocks)."""
    fde = FDE(6, FDEConfig(k_sim=0, d_proj=None, repetitions=1))
    q, p = rand(1, 3, 6), rand(1, 5, 6, seed=1)
    got = fde.queries(q) @ fde.documents(p).T
    torch.testing.assert_close(got[0, 0], (q[0] @ p[0].mean(0)).sum(), atol=1e-6, rtol=0)


def test_projection_is_a_scaled_sign_matrix_and_bits_are_simhash():
    fde = FDE(8, FDEConfig(k_sim=3, d_proj=4, repetitions=2))
    assert set((fde.proj * math.sqrt(4)).unique().tolist()) == {-1.0, 1.0}
    x = rand(2, 3, 8)
    codes = fde.bucket(x)
    for r in range(2):
        for n in range(2):
            for t in range(3):
                bits = [int(float(fde.planes[r, i] @ x[n, t]) > 0) for i in range(3)]
                assert int(codes[r, n, t]) == sum(b << i for i, b in enumerate(bits))


def test_maxsim_equals_a_direct_loop():
    q, d = rand(3, 4, 5), rand(6, 7, 5, seed=1)
    qm = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    dm = torch.arange(7)[None] < torch.tensor([7, 1, 3, 5, 2, 6])[:, None]
    got = maxsim(q, qm, d, dm, block=4)
    for a in range(3):
        for b in range(6):
            want = sum(max(float(q[a, i] @ d[b, j]) for j in range(7) if dm[b, j]) for i in range(4) if qm[a, i])
            assert abs(float(got[a, b]) - want) <= 1e-5


def test_fde_candidates_hold_the_exact_maxsim_top_10():
    """The documented settings (FDEConfig defaults: k_sim=4, d_proj=16, R=16, 4096 numbers) on 3000
    documents of 8-24 clustered tokens: recall@100 of the exact MaxSim top 10 >= 0.9 (measured 0.97)."""
    docs, doc_mask, queries, query_mask = clustered_corpus(num_docs=3000, num_queries=50)
    index = MuveraIndex(docs, doc_mask, FDEConfig())
    assert index.fde.width == 4096
    recall = recall_of_exact_top(index, queries, query_mask, k=10, candidates=100)
    assert recall >= 0.9, recall
    # re-ranked search returns the exact scores of the documents it found, best first
    scores, ids = index.search(queries[:5], query_mask[:5], k=10, candidates=100)
    exact = maxsim(queries[:5], query_mask[:5], docs, doc_mask)
    torch.testing.assert_close(scores, exact.gather(1, ids), atol=1e-5, rtol=0)
    assert (scores[:, :-1] >= scores[:, 1:]).all()


# ---------------------------------------------------------------- embedkit eval: data.eval.retrieval=muvera


def token_sets(n, T, d, seed):
    """[n, T, d] unit token vectors, 1..T real tokens first, zero padding (a multi_vector head's layout)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, T, d, generator=g), dim=-1)
    lengths = torch.randint(1, T + 1, (n,), generator=g)
    return x * (torch.arange(T)[None, :] < lengths[:, None])[..., None]


def synthetic_rows(seed=0):
    """Token-set queries and candidates, rows of 3..12 candidates (some shared between rows)."""
    g = torch.Generator().manual_seed(seed)
    q, c = token_sets(7, 6, 16, seed), token_sets(40, 9, 16, seed + 1)
    q_index = torch.randint(0, 7, (25,), generator=g).tolist()
    c_index = [torch.randperm(40, generator=g)[: int(torch.randint(3, 13, (1,), generator=g))].tolist()
               for _ in range(25)]
    return q, c, q_index, c_index


def test_muvera_rows_reranking_every_candidate_equal_exact_maxsim():
    from embedkit.eval.muvera import MuveraRetrieval, muvera_row_scores
    from embedkit.eval.retrieval import precision_at_1, row_scores

    q, c, qi, ci = synthetic_rows()
    exact = row_scores(q, c, qi, ci)
    got, info = muvera_row_scores(q, c, qi, ci, MuveraRetrieval(FDEConfig(k_sim=2, d_proj=4, repetitions=3), 12))
    torch.testing.assert_close(got, exact, atol=1e-6, rtol=0)  # -inf past each row's candidates too
    assert precision_at_1(got) == precision_at_1(exact)
    assert info["fde_numbers"] == 3 * 4 * 4 and info["fde_bytes"] == 4 * 48 and info["reranked"] == 12


def test_muvera_rows_rerank_the_fde_best_and_keep_the_rest_below_in_fde_order():
    from embedkit.eval.muvera import FDE, MuveraRetrieval, muvera_row_scores
    from embedkit.eval.retrieval import row_scores
    from embedkit.losses.similarity import token_mask

    q, c, qi, ci = synthetic_rows(seed=3)
    config, k = FDEConfig(k_sim=2, d_proj=4, repetitions=3), 4
    got, _ = muvera_row_scores(q, c, qi, ci, MuveraRetrieval(config, k))
    exact = row_scores(q, c, qi, ci)
    fde = FDE(16, config)
    q_fde, c_fde = fde.queries(q, token_mask(q)), fde.documents(c, token_mask(c))
    for r, (a, row) in enumerate(zip(qi, ci)):
        approx = [float(q_fde[a] @ c_fde[j]) for j in row]  # the FDE inner product, one pair at a time
        top = sorted(range(len(row)), key=lambda j: -approx[j])[:k]
        rest = [j for j in range(len(row)) if j not in top]
        for j in top:
            assert abs(float(got[r, j]) - float(exact[r, j])) <= 1e-6
        if rest:
            assert float(got[r, rest].max()) < float(got[r, top].min())
            order = sorted(rest, key=lambda j: -approx[j])
            assert got[r, order].tolist() == sorted(got[r, order].tolist(), reverse=True)
        assert got[r, len(row):].isinf().all()


def test_muvera_on_single_vectors_is_a_one_line_user_error():
    from embedkit.errors import UserError
    from embedkit.eval.muvera import MuveraRetrieval, muvera_row_scores
    from embedkit.pooling.last_token import LastTokenPooling

    settings = MuveraRetrieval(FDEConfig())
    with pytest.raises(UserError, match="data.eval.retrieval=muvera: the model .* gives one vector per input"):
        muvera_row_scores(rand(3, 8), rand(5, 8), [0, 1], [[0, 1], [2, 3, 4]], settings)

    class Single:
        pooling = LastTokenPooling()

    with pytest.raises(UserError, match=r"\(LastTokenPooling\) gives one vector .*model.pooling=multi_vector") as err:
        settings.check_model(Single())
    assert "\n" not in str(err.value)


def test_muvera_config_keys_and_their_errors():
    from embedkit.config.loader import compose
    from embedkit.errors import ConfigError
    from embedkit.eval.muvera import MuveraRetrieval

    ev = compose(["recipe=demo"])["data"]["eval"]
    assert ev["retrieval"] == "exact"
    default = MuveraRetrieval.from_config(ev["muvera"])  # the documented settings (docs/muvera.md)
    assert (default.fde, default.candidates) == (FDEConfig(), 100)
    ev = compose(["recipe=demo", "data.eval.retrieval=muvera", "data.eval.muvera.k_sim=3",
                  "data.eval.muvera.d_proj=null", "data.eval.muvera.repetitions=5", "data.eval.muvera.candidates=7"])
    got = MuveraRetrieval.from_config(ev["data"]["eval"]["muvera"])
    assert ev["data"]["eval"]["retrieval"] == "muvera"
    assert (got.fde.k_sim, got.fde.d_proj, got.fde.repetitions, got.candidates) == (3, None, 5, 7)
    for word, msg in (("data.eval.retrieval=fde", "data.eval.retrieval: 'fde' is not accepted; choices: exact, muvera"),
                      ("data.eval.muvera.candidates=0", "data.eval.muvera.candidates: 0 is below its minimum, 1"),
                      ("data.eval.muvera.k_sims=3", "data.eval.muvera.k_sims: unknown key")):
        with pytest.raises(ConfigError, match=msg):
            compose(["recipe=demo", word])


def tiny_checkpoint(path, *overrides):
    """A checkpoint of the demo recipe's random tiny model (no training), as ``embedkit fit`` lays it out."""
    from embedkit.config.loader import compose
    from embedkit.encoder import CHECKPOINT_PREFIX, Encoder

    cfg = compose(["recipe=demo", *overrides])
    encoder = Encoder.from_config(cfg["model"], seed=cfg["seed"])
    state = {CHECKPOINT_PREFIX + k: v for k, v in encoder.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"config": cfg}, "global_step": 0}, path)
    return path


def test_eval_command_ranks_token_sets_by_muvera(tmp_path, capsys):
    """``embedkit eval data.eval.retrieval=muvera`` on a multi_vector checkpoint: re-ranking all 10
    candidates of each row gives exact MaxSim's scores; fewer re-ranks run the FDE path; a single-vector
    checkpoint is a one-line error before anything is encoded."""
    import json

    from embedkit.cli import main as cli
    from tests.helpers import mmeb_fixture as fx

    root = tmp_path / "mmeb"
    fx.build(root, rows=20)
    ckpt = tiny_checkpoint(tmp_path / "mv.ckpt", "model.pooling=multi_vector", "model.pooling.dim=16")
    common = ["eval", f"ckpt={ckpt}", f"data.eval.root={root}", "data.eval.datasets=[N24News,RefCOCO]",
              "tracking.enabled=false", "train.chunk_size=20"]
    runs = {}
    for name, words in (("exact", []), ("muvera", ["data.eval.retrieval=muvera"]),
                        ("muvera3", ["data.eval.retrieval=muvera", "data.eval.muvera.candidates=3"])):
        assert cli([*common, f"out={tmp_path / name}", *words]) == 0
        runs[name] = json.loads((tmp_path / name / "summary.json").read_text())["datasets"]
    out = capsys.readouterr().out
    assert "MUVERA: FDE of 4096 numbers (16384 B per set" in out and "best 3 re-ranked by MaxSim" in out
    for ds in ("N24News", "RefCOCO"):
        exact, full, three = runs["exact"][ds], runs["muvera"][ds], runs["muvera3"][ds]
        assert "muvera" not in exact["details"]
        assert full["details"]["muvera"]["reranked"] == 10 and three["details"]["muvera"]["reranked"] == 3
        for key in ("recall@1", "recall@5", "recall@10", "mrr"):
            assert full["details"][key] == pytest.approx(exact["details"][key], abs=1e-6)
        assert full["acc"] == exact["acc"] and full["num_pred"] == 20
        assert three["details"]["recall@10"] == 1.0  # every candidate still ranked (the rest by FDE)
    single = tiny_checkpoint(tmp_path / "single.ckpt")
    assert cli(["eval", f"ckpt={single}", f"data.eval.root={root}", "data.eval.retrieval=muvera",
                "tracking.enabled=false", f"out={tmp_path / 'single'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.eval.retrieval=muvera: the model (LastTokenPooling) gives one vector" in err
    assert not (tmp_path / "single").exists()
