"""embedkit models in the ``mteb`` package's own evaluator: a tiny local retrieval task (text -> text and
image -> text) built here with mteb's task classes, scored by ``mteb.evaluate``, and checked against the
same metric computed by hand from the embedkit encoder's embeddings. Skipped only where the optional
``mteb`` extra is not installed (``make test`` installs it)."""

from __future__ import annotations

import pytest

mteb = pytest.importorskip("mteb")

from datasets import Dataset  # noqa: E402  (mteb's own dependency)
from mteb.abstasks.retrieval import AbsTaskRetrieval  # noqa: E402
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData  # noqa: E402
from mteb.abstasks.task_metadata import TaskMetadata  # noqa: E402

from embedkit.export.mteb_encoder import MtebEncoder  # noqa: E402
from tests.helpers.images import speckled_image  # noqa: E402
from tests.helpers.models import tiny_encoder  # noqa: E402

# words of the tiny vocabulary only (an unknown word is <unk>, and two texts ending alike can tie)
QUERIES = ["a red square", "the blue cat", "green dog", "yellow car", "one photo"]
DOCS = ["red", "a blue cat", "the green dog", "yellow", "a photo of one", "two three", "square car"]
SEEDS = [1, 2, 3, 4, 5]


def picture(seed: int):
    return speckled_image(56, 56, seed)


def metadata(name: str, category: str, modalities: list[str]) -> TaskMetadata:
    return TaskMetadata(
        name=name, type="Retrieval", main_score="mrr_at_10", description="a local test task",
        reference="https://example.org", dataset={"path": "local/none", "revision": "0"}, category=category,
        eval_splits=["test"], eval_langs=["eng-Latn"], date=("2026-01-01", "2026-01-01"), dialect=[],
        domains=[], task_subtypes=[], license="cc-by-4.0", annotations_creators="derived",
        modalities=modalities, sample_creation="found", bibtex_citation="")


def task(name: str, images: bool):
    """Query i's one relevant document is DOCS[i]; the queries are texts, or images with images=True."""
    rows = [{"id": f"q{i}", **({"image": picture(c)} if images else {"text": q})}
            for i, (q, c) in enumerate(zip(QUERIES, SEEDS))]

    class LocalTask(AbsTaskRetrieval):
        metadata_ = None

        def load_data(self, num_proc=None, **kwargs):
            split = RetrievalSplitData(
                queries=Dataset.from_list(rows),
                corpus=Dataset.from_list([{"id": f"d{j}", "text": d} for j, d in enumerate(DOCS)]),
                relevant_docs={f"q{i}": {f"d{i}": 1} for i in range(len(QUERIES))}, top_ranked=None)
            self.dataset = {"default": {"test": split}}
            self.data_loaded = True

    LocalTask.metadata = metadata(name, "i2t" if images else "t2t", ["image", "text"] if images else ["text"])
    return LocalTask()


def mrr_by_hand(encoder, queries, query_instruction=None, images=False) -> float:
    """MRR@10 over cosine scores of the embedkit encoder (query i's relevant document is DOCS[i])."""
    q = encoder.encode(None if images else queries, [picture(c) for c in SEEDS] if images else None,
                       instruction=query_instruction)
    scores = q @ encoder.encode(DOCS).T
    assert all(len(set(row.tolist())) == len(DOCS) for row in scores)  # no ties: the ranking is defined
    ranks = scores.argsort(dim=1, descending=True)
    return sum(1.0 / (ranks[i].tolist().index(i) + 1) for i in range(len(queries))) / len(queries)


def run(model, t) -> float:
    result = mteb.evaluate(model, t, cache=None, show_progress_bar=False)
    return result.task_results[0].scores["test"][0]["mrr_at_10"]


@pytest.fixture(scope="module")
def encoder():
    return tiny_encoder("qwen2_vl")


def test_text_retrieval_scored_by_mteb_equals_the_hand_computation(encoder):
    score = run(MtebEncoder(encoder, name="embedkit/tiny"), task("LocalTextRetrieval", images=False))
    assert score == pytest.approx(mrr_by_hand(encoder, QUERIES), abs=1e-5)


def test_a_query_prompt_reaches_the_query_side_only(encoder):
    prompts = {"LocalTextRetrieval2-query": "Find the colour: "}
    model = MtebEncoder(encoder, name="embedkit/tiny", prompts=prompts)
    score = run(model, task("LocalTextRetrieval2", images=False))
    assert score == pytest.approx(mrr_by_hand(encoder, QUERIES, "Find the colour: "), abs=1e-5)
    assert model.mteb_model_meta.use_instructions is True


def test_image_queries_against_texts(encoder):
    score = run(MtebEncoder(encoder, name="embedkit/tiny"), task("LocalImageRetrieval", images=True))
    assert score == pytest.approx(mrr_by_hand(encoder, QUERIES, images=True), abs=1e-5)


def test_a_path_is_opened_by_embedkit_load(tmp_path):
    from embedkit.errors import UserError

    with pytest.raises(UserError):
        MtebEncoder(str(tmp_path / "no-such-model"))
