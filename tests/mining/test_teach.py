"""``mining/teacher.py`` on a fixed-embedding teacher: what a taught shard holds, the judge's scores, the
batch layout of the teacher rows (cycled and borrowed negatives), resumability and byte-identical reruns."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from embedkit.data.batch import ChunkCollate
from embedkit.data.pixels import BadSample
from embedkit.data.schema import Example, Item, TeacherArrays
from embedkit.data.shards import decode_sample, encode_example, iter_samples, npy_bytes, write_shard
from embedkit.mining.judges.embedding import EmbeddingJudge
from embedkit.mining.teacher import Teach, TeachSettings, build_manifest

DT = 6


class FixedEncoder:
    """``encode_items`` from a table keyed by text (a teacher whose answers the test knows)."""

    def __init__(self):
        self.table: dict[str, torch.Tensor] = {}
        self.sides: set[tuple] = set()

    def vector(self, text: str) -> torch.Tensor:
        if text not in self.table:
            g = torch.Generator().manual_seed(zlib.crc32(text.encode()))  # the text's own vector, in any order
            self.table[text] = F.normalize(torch.randn(DT, generator=g), dim=-1)
        return self.table[text]

    def encode_items(self, items, batch_size=32, side=None):
        self.sides.update((side, it.text[0]) for it in items)
        return torch.stack([self.vector(it.text) for it in items])


def examples(shard: int) -> list[Example]:
    """Four examples per shard with 0, 1, 2 and 3 hard negatives."""
    return [Example(Item(f"q{shard}.{i}"), Item(f"p{shard}.{i}"), [Item(f"n{shard}.{i}.{j}") for j in range(i)],
                    task="synth") for i in range(4)]


@pytest.fixture
def src(tmp_path):
    root = tmp_path / "src"
    for s in range(3):
        write_shard(root / "synth" / f"train-{s:06d}.tar", [encode_example(ex, f"{s}{i:05d}") for i, ex in
                                                            enumerate(examples(s))])
    return root


def shards(src):
    return [(str(src / "synth" / f"train-{s:06d}.tar"), f"synth/train-{s:06d}.tar") for s in range(3)]


def teach(src, out, judge=None, encoder=None, **settings):
    return Teach(encoder or FixedEncoder(), judge, shards(src), out, TeachSettings(**settings), log=lambda m: None).run()


def tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_taught_shards_hold_the_teachers_embeddings_and_the_judges_scores(src, tmp_path):
    encoder = FixedEncoder()
    stats = teach(src, tmp_path / "out", judge=EmbeddingJudge(), encoder=encoder, store_dtype="float32")
    assert stats["synth/train-000001.tar"] == {"examples": 4, "dim": DT, "slots": 2 * 4 + 6, "scored": 4 + 6}
    for (path, rel) in shards(src):
        source = list(iter_samples(path))
        for (key, files), (src_key, src_files) in zip(iter_samples(tmp_path / "out" / rel), source):
            assert key == src_key and {k: files[k] for k in src_files} == src_files  # copied as stored
            ex = decode_sample(key, files)
            texts = [ex.query.text, ex.positive.text, *(n.text for n in ex.negatives)]
            expected = np.stack([encoder.table[t].numpy() for t in texts])
            assert ex.teacher.embeddings.dtype == np.float32 and np.array_equal(ex.teacher.embeddings, expected)
            want = expected[1:] @ expected[0]  # the embedding judge: the teacher's cosine of (query, candidate)
            assert ex.teacher.scores.shape == (1 + len(ex.negatives),)
            assert np.abs(ex.teacher.scores - want).max() < 1e-6
    # queries as queries; positives and negatives as documents (a GME teacher's candidate system message)
    assert encoder.sides == {(None, "q"), ("candidate", "p"), ("candidate", "n")}


def test_float16_is_the_default_store_and_untaught_samples_have_no_teacher(src, tmp_path):
    teach(src, tmp_path / "out")
    key, files = next(iter_samples(tmp_path / "out" / "synth" / "train-000000.tar"))
    ex = decode_sample(key, files)
    assert ex.teacher.embeddings.dtype == np.float16 and ex.teacher.scores is None
    key, files = next(iter_samples(src / "synth" / "train-000000.tar"))
    assert decode_sample(key, files).teacher is None


def test_a_rerun_is_byte_identical_and_an_interrupted_teach_resumes(src, tmp_path, monkeypatch):
    teach(src, tmp_path / "one", judge=EmbeddingJudge())
    teach(src, tmp_path / "two", judge=EmbeddingJudge())
    assert tree(tmp_path / "one") == tree(tmp_path / "two")
    # a full disk after the 2nd shard is written, before its counts: the run stops there
    monkeypatch.setenv("EMBEDKIT_FAULT_PLAN", "teach_shard:2:enospc")
    with pytest.raises(OSError):
        teach(src, tmp_path / "cut", judge=EmbeddingJudge())
    monkeypatch.delenv("EMBEDKIT_FAULT_PLAN")
    assert not (tmp_path / "cut" / ".teach" / "synth" / "train-000001.tar.json").exists()
    assert not (tmp_path / "cut" / "synth" / "train-000002.tar").exists()
    seen = []
    Teach(FixedEncoder(), EmbeddingJudge(), shards(src), tmp_path / "cut", TeachSettings(), log=seen.append).run()
    assert any("train-000000.tar: complete, skipped" in m for m in seen)
    assert tree(tmp_path / "cut") == tree(tmp_path / "one")


def test_teaching_a_taught_set_replaces_its_teacher_members(src, tmp_path):
    teach(src, tmp_path / "one", judge=EmbeddingJudge())
    again = Teach(FixedEncoder(), None, [(str(tmp_path / "one" / rel), rel) for _, rel in shards(src)],
                  tmp_path / "two", TeachSettings(), log=lambda m: None)
    again.run()
    key, files = next(iter_samples(tmp_path / "two" / "synth" / "train-000000.tar"))
    assert decode_sample(key, files).teacher.scores is None  # the old judge scores are gone
    assert sum(name.endswith("teacher.npy") for name in files) == 1


def test_the_manifest_counts_subsets_and_names_the_dim():
    stats = {"a/x.tar": {"examples": 3, "dim": 8}, "a/y.tar": {"examples": 2, "dim": 8}, "z.tar": {"examples": 1, "dim": 8}}
    m = build_manifest(stats, {"a": {"query_modality": "text"}}, {"model_sha256": "f" * 64, "dtype": "float16"})
    assert m["subsets"]["a"] == {"query_modality": "text", "count": 5, "shards": [
        {"path": "a/x.tar", "count": 3}, {"path": "a/y.tar", "count": 2}]}
    assert m["subsets"]["."]["count"] == 1
    assert m["teaching"]["dim"] == 8 and m["teaching"]["examples"] == 6 and m["teaching"]["dtype"] == "float16"


def test_a_teacher_array_with_the_wrong_rows_is_a_bad_sample():
    ex = examples(0)[2]  # two negatives: 4 embedding rows, 3 scores
    files = encode_example(ex, "k")
    files["k.teacher.npy"] = npy_bytes(np.zeros((3, DT), np.float16))
    with pytest.raises(BadSample) as info:
        decode_sample("k", files)
    assert info.value.reason == "bad_json" and "3 rows for 4 slots" in str(info.value)
    files["k.teacher.npy"] = b"not an array"
    with pytest.raises(BadSample, match="not a .npy array"):
        decode_sample("k", files)


class Processor:
    def __call__(self, items):
        return {"texts": [it.text for it in items]}


def test_the_batch_lays_the_teacher_rows_out_as_its_candidates():
    """K=2: example 0 has no negatives (borrows the others' positives), example 1 has one (cycled),
    example 2 has three (the first two). The teacher rows follow the candidates; borrowed slots have no
    judge score (NaN)."""
    exs = [examples(0)[i] for i in (0, 1, 3)]
    rows = {}
    for ex in exs:
        texts = [ex.query.text, ex.positive.text, *(n.text for n in ex.negatives)]
        emb = np.stack([np.full(DT, zlib.crc32(t.encode()) % 97, np.float32) for t in texts])
        rows.update({t: e for t, e in zip(texts, emb)})
        ex.teacher = TeacherArrays(emb.astype(np.float16), np.arange(len(texts) - 1, dtype=np.float32) + 10)
    batch = ChunkCollate(Processor(), chunk_size=4, num_negatives=2)(exs)
    cands = [c for chunk in batch.candidate_chunks for c in chunk["texts"]]
    assert torch.equal(batch.teacher_candidates, torch.from_numpy(np.stack([rows[t] for t in cands])))
    assert torch.equal(batch.teacher_queries, torch.from_numpy(np.stack([rows[ex.query.text] for ex in exs])))
    assert cands[3:5] == [exs[1].positive.text, exs[2].positive.text]  # example 0 borrowed
    assert cands[5:7] == [exs[1].negatives[0].text] * 2  # example 1's one negative, cycled
    s = batch.teacher_scores
    assert s[0, 0] == 10 and torch.isnan(s[0, 1:]).all()
    assert s[1].tolist() == [10.0, 11.0, 11.0] and s[2].tolist() == [10.0, 11.0, 12.0]
    exs[1].teacher = None  # one example without: the batch carries none
    assert ChunkCollate(Processor(), chunk_size=4, num_negatives=2)(exs).teacher_candidates is None


def test_the_manifest_of_a_cli_run_is_json(src, tmp_path):
    stats = teach(src, tmp_path / "out")
    assert json.dumps(build_manifest(stats, {}, {}), sort_keys=True)


def test_a_sentence_transformers_folder_teaches_text_shards(src, tmp_path):
    """``embedkit teach model=ST_FOLDER``: a text embedder (UniME stage 1's kind of teacher); the stored
    embeddings are the folder's own, and the manifest hashes the folder's files."""
    import shutil

    from embedkit.cli import main as cli
    from embedkit.export.reader import open_model
    from embedkit.export.writer import export_model
    from tests.export.test_export import trained_run

    run, _ = trained_run(tmp_path / "run", ["model.backbone=hf_text", "model.backbone.tiny=true"])
    st = tmp_path / "st"
    shutil.copytree(export_model(run, tmp_path / "export", log=lambda m: None), st)
    (st / "embedkit.json").unlink()  # no longer an embedkit export: a plain sentence-transformers folder
    assert cli(["teach", f"model={st}", f"shards={src}", f"out={tmp_path / 'out'}", "store_dtype=float32"]) == 0
    teaching = json.loads((tmp_path / "out" / "manifest.json").read_text())["teaching"]
    model, provenance = open_model(st)
    assert provenance.kind == "sentence_transformers" and len(teaching["model_sha256"]) == 64
    key, files = next(iter_samples(tmp_path / "out" / "synth" / "train-000001.tar"))
    ex = decode_sample(key, files)
    want = model.encode_items([ex.query, ex.positive]).numpy()
    assert np.abs(ex.teacher.embeddings - want).max() < 1e-5 and teaching["dim"] == want.shape[1]
