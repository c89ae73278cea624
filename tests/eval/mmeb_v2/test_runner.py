"""The MMEB-V2 runner on the fixture layout with a fake encoder: every family scored as a naive loop
scores it, the leaderboard means equal a hand computation, one report of what is missing, ``partial``,
and the cache: a second run encodes nothing and writes the same bytes."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from embedkit.errors import UserError
from embedkit.eval.mmeb_v2 import runner
from embedkit.eval.mmeb_v2.cache import EmbeddingCache
from embedkit.eval.mmeb_v2.protocol import protocol_from_file
from tests.eval.mmeb_v2 import fixtures as fx

DIM = 8


def vector(item) -> torch.Tensor:
    """A fake embedding from the item's text and the mean colour of its visuals: similar items, similar
    vectors (so scores vary by task), a pure function of the item (so caching is exact)."""
    seed = int(hashlib.sha1((item.text or "").encode()).hexdigest()[:8], 16)
    v = torch.randn(DIM, generator=torch.Generator().manual_seed(seed)) * 0.3
    visuals = list(item.images) + (list(item.video.images) if item.video is not None else [])
    if visuals:
        mean = np.mean([np.asarray(im.convert("RGB"), dtype=np.float64).mean(axis=(0, 1)) for im in visuals], axis=0)
        v[:3] += torch.tensor(mean / 255.0, dtype=torch.float32)
    return v


class Counting:
    def __init__(self):
        self.items = 0

    def __call__(self, items):
        self.items += len(items)
        return torch.stack([vector(items[i]) for i in range(len(items))])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("v2run")
    counts = fx.write_layout(tmp / "data")
    protocol = protocol_from_file(fx.small_protocol(tmp / "protocol.yaml", counts))
    prepared = runner.prepare(protocol, tmp / "data")
    encode = Counting()
    records = runner.evaluate(prepared, encode, EmbeddingCache(tmp / "cache", "m" * 64), log=lambda m: None)
    return tmp, protocol, prepared, records, encode.items


def naive_hit1(task, items_of) -> float:
    """hit@1 by a loop over each query's candidates (its own, or the whole corpus), first best on ties."""
    hits = 0
    for n, row in enumerate(task.queries):
        q = torch.nn.functional.normalize(vector(items_of([row])[0]), dim=0)
        cands = task.candidates[n] if task.candidates is not None else range(len(task.corpus))
        scores = [float(q @ torch.nn.functional.normalize(vector(items_of([task.corpus[c]])[0]), dim=0)) for c in cands]
        best = list(cands)[int(np.argmax(scores))]
        hits += task.qrels[n].get(best, 0) > 0
    return hits / len(task.queries)


def test_every_task_is_scored_as_a_naive_loop_scores_it(setup):
    _, protocol, prepared, records, _ = setup
    assert list(records) == protocol.names()
    for pin, task, _ in prepared.tasks:
        items_of = lambda rows, cap=pin.pixels["max_pixels"]: runner.TaskItems(rows, cap)  # noqa: E731
        assert records[pin.name]["metrics"]["hit@1"] == pytest.approx(naive_hit1(task, items_of), abs=1e-9), pin.name
        assert records[pin.name]["score"] == records[pin.name]["metrics"][pin.metric]
        assert records[pin.name]["task_fingerprint"] == pin.fingerprint()
        assert ("ndcg_linear@5_vlm2vec" in records[pin.name]) == (pin.modality == "visdoc")
    assert len({r["score"] for r in records.values()}) > 3  # the fake encoder does not score everything alike


def test_vlm2vec_ndcg_keys_on_the_datasets_integer_ids(setup):
    """ViDoRe's int corpus-ids reach VLM2Vec's pairing (one set order in every process); VisRAG's string ids
    do not (their set order would follow PYTHONHASHSEED), and its grades are uniform there."""
    from embedkit.eval import ranking

    _, _, prepared, records, _ = setup
    by_name = {pin.name: (pin, task) for pin, task, _ in prepared.tasks}
    pin, task = by_name["ViDoRe_esg_reports_human_labeled_v2"]
    assert runner.vlm2vec_ids(task.corpus) == [0, 1, 2, 3, 4]
    items = runner.TaskItems(task.queries, None), runner.TaskItems(task.corpus, None)
    q, c = (torch.stack([vector(side[i]) for i in range(len(side))]) for side in items)
    scores, qrels, _ = runner.scores_of(task, q, c, normalize=True)
    assert records[pin.name]["ndcg_linear@5_vlm2vec"] == ranking.ndcg_vlm2vec_convention(scores, qrels, ids=[0, 1, 2, 3, 4])
    assert runner.vlm2vec_ids(by_name["VisRAG_ArxivQA"][1].corpus) is None


def test_summary_means_are_the_hand_computed_means(setup):
    tmp, protocol, prepared, records, _ = setup
    result, summary = runner.finish(tmp / "out", protocol, {"fingerprint": "m" * 64}, records, prepared,
                                    log=lambda m: None)
    scores = {n: 100 * r["score"] for n, r in records.items()}
    by_group: dict[str, list[float]] = {}
    for pin in protocol.tasks:
        by_group.setdefault(pin.group, []).append(scores[pin.name])
    assert summary.overall == pytest.approx(sum(scores.values()) / 17)  # over tasks, not over groups
    for group, values in by_group.items():
        assert summary.groups[group] == pytest.approx(sum(values) / len(values)), group
    video = [scores[p.name] for p in protocol.tasks if p.modality == "video"]
    assert summary.modalities["Video"] == pytest.approx(sum(video) / len(video)) and len(video) == 14
    written = json.loads((tmp / "out" / "mmeb_v2" / "results.json").read_text())
    assert written["protocol"]["fingerprint"] == protocol.fingerprint() and written["model"]["fingerprint"] == "m" * 64
    assert written["partial"] is False and written["tasks"] == json.loads(json.dumps(records))
    written_summary = json.loads((tmp / "out" / "mmeb_v2" / "summary.json").read_text())
    assert written_summary["partial"] is False and written_summary["model"]["fingerprint"] == "m" * 64
    assert written_summary["protocol_fingerprint"] == protocol.fingerprint()
    from embedkit.eval.mmeb_v2.summary import from_dict

    assert from_dict(written_summary) == summary  # compare reads it back as B's summary


def test_report_diffs_the_run_against_a_published_score_file(setup):
    tmp, protocol, prepared, records, _ = setup
    published = fx.Path(__file__).parent / "fixtures" / "v2.0.0_VLM2Vec-V2.0-Qwen2VL-2B.json"
    runner.finish(tmp / "rep", protocol, {"fingerprint": "m" * 64}, records, prepared, report_file=str(published),
                  log=lambda m: None)
    text = (tmp / "rep" / "mmeb_v2" / "report.md").read_text()
    rows = {r["task"]: r for r in json.loads((tmp / "rep" / "mmeb_v2" / "report.json").read_text())["rows"]}
    assert "| MSR-VTT |" in text and rows["MSR-VTT"]["ours"] == pytest.approx(100 * records["MSR-VTT"]["score"])
    assert rows["MSR-VTT"]["differs"] == ["count"]  # the fixture's 3 queries against the published 1000


def test_a_second_run_reads_the_cache_and_writes_the_same_bytes(setup):
    tmp, protocol, prepared, records, encoded = setup
    assert encoded > 0
    again = Counting()
    second = runner.evaluate(prepared, again, EmbeddingCache(tmp / "cache", "m" * 64), log=lambda m: None)
    assert again.items == 0
    one = runner.results(protocol, {"fingerprint": "m" * 64}, records, prepared)
    two = runner.results(protocol, {"fingerprint": "m" * 64}, second, prepared)
    runner.write(tmp / "a", one)
    runner.write(tmp / "b", two)
    assert (tmp / "a" / "mmeb_v2" / "results.json").read_bytes() == (tmp / "b" / "mmeb_v2" / "results.json").read_bytes()
    other = Counting()  # another model's fingerprint: nothing of the first is reused
    runner.evaluate(prepared, other, EmbeddingCache(tmp / "cache", "n" * 64), log=lambda m: None)
    assert other.items == encoded


def test_missing_and_miscounted_tasks_are_one_report_unless_allowed(setup, tmp_path):
    _, protocol, _, _, _ = setup
    fx.write_layout(tmp_path, [p for p in fx.TASKS if p not in ("msvd", "visrag")])
    fx.table(tmp_path / "K700" / "data" / "test-00000-of-00001.parquet",
             [{"video_id": "vid0", "pos_text": "abseiling"}])
    fx.table(tmp_path / "SmthSmthV2" / "data" / "test-00000-of-00001.parquet",
             [{"video_id": "0", "pos_text": "a", "neg_text": 3}])  # neg_text not a list
    with pytest.raises(UserError) as err:
        runner.prepare(protocol, tmp_path)
    message = str(err.value)
    assert "\n" not in message and "4 of 17 tasks" in message
    for part in ("MSVD: no folder", "VisRAG_ArxivQA: no folder", "K700: 1 queries, the pin says 4", "allow_missing=true",
                 "SmthSmthV2: rows not in the ssv2 layout (TypeError"):
        assert part in message, message
    prepared = runner.prepare(protocol, tmp_path, allow_missing=True)
    assert prepared.partial and list(prepared.missing) == ["K700", "SmthSmthV2", "MSVD", "VisRAG_ArxivQA"]
    assert len(prepared.tasks) == 13
    with pytest.raises(UserError, match="data.eval.mmeb_v2_root=DIR"):
        runner.prepare(protocol, None)


def test_annotation_files_are_hashed_into_the_results_and_a_pinned_hash_must_match(setup, tmp_path):
    from dataclasses import replace

    from embedkit.eval.mmeb_v2.protocol import Protocol
    from embedkit.files import sha256_file

    root, protocol, prepared, records, _ = setup
    pin = protocol.tasks[0]
    found = records[pin.name]["data_files"]
    assert found and all(sha256_file(root / "data" / pin.name / rel) == d for rel, d in found.items())
    rel, digest = sorted(found.items())[0]

    def pinned(files):
        task = replace(pin, dataset={**pin.dataset, "files": files})
        return Protocol(protocol.benchmark, protocol.version, (task,))

    assert runner.prepare(pinned({rel: digest}), root / "data").tasks  # the download the pin names
    other = "f" * 64
    with pytest.raises(UserError, match=f"{pin.name}: {rel} has sha256 {digest[:12]}, the pin says {other[:12]}"):
        runner.prepare(pinned({rel: other}), root / "data")
    with pytest.raises(UserError, match=f"{pin.name}: pinned file gone.parquet not found"):
        runner.prepare(pinned({"gone.parquet": digest}), root / "data")


def test_the_corpus_is_encoded_on_the_candidate_side(setup, tmp_path):
    _, _, prepared, records, _ = setup
    queries, candidates = Counting(), Counting()
    again = runner.evaluate(prepared, queries, EmbeddingCache(tmp_path / "cache", "c" * 64), log=lambda m: None,
                            encode_candidates=candidates)
    assert candidates.items == sum(len(task.corpus) for _, task, _ in prepared.tasks)
    assert queries.items < sum(len(task.queries) for _, task, _ in prepared.tasks) + 1  # distinct queries only
    assert {n: r["score"] for n, r in again.items()} == {n: r["score"] for n, r in records.items()}
