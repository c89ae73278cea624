"""The data fuzzer (``bench/fuzz_data.py``), a small seeded set: for every backbone family each sample is
trained on or skipped with its reason -- the deterministic mutations with the reason they must get --
and the admitted ones go through the family's processor and forward without a crash. (The full 1,000
samples, trained by ``embedkit fit`` per family: ``PYTHONPATH=. python bench/fuzz_data.py``.)"""

from __future__ import annotations

import tarfile
from collections import Counter

import pytest
import torch

from bench.fuzz_data import IMAGE_MUTATIONS, MUTATIONS, SHARD_MUTATIONS, write_fuzz_shards
from embedkit.data.batch import ChunkCollate, chunked
from embedkit.data.reader import take
from embedkit.data.shards import SKIP_REASONS, iter_samples

PH = "<|image_1|>"
#: the outcome a mutation must have in a whole shard ("trained" or a skip reason); absent: any outcome
EXPECTED = {"good": "trained", "exif": "trained", "image_mode": "trained", "empty_text": "trained",
            "missing_member": "missing_member", "no_json": "missing_member", "utf8": "bad_text",
            "surrogate": "bad_text", "image_cut": "decode", "long_text": "processor", "placeholders": "processor"}
FAMILY_EXPECTED = {
    "qwen2_vl": {"image_size": {"trained", "processor"}},  # aspect ratio >= 200
    "llava_onevision": {"image_size": "trained"},
    "phi3_v": {"image_size": "trained"},
    "hf_text": {"long_text": "trained"},  # truncated to max_length
}


def _backbone(family: str):
    from embedkit.backbones.hf_text import HFText
    from embedkit.backbones.llava_onevision import LlavaOnevision
    from embedkit.backbones.phi3_v import Phi3V
    from embedkit.backbones.qwen2_vl.adapter import Qwen2VLBackbone

    if family == "qwen2_vl":
        return Qwen2VLBackbone(seed=0, tiny=True, min_pixels=3136, max_pixels=3136)
    return {"llava_onevision": LlavaOnevision, "phi3_v": Phi3V, "hf_text": HFText}[family](seed=0, tiny=True).eval()


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    return {text_only: write_fuzz_shards(root / str(text_only), seed=3, samples=64, per_shard=8, text_only=text_only)
            for text_only in (False, True)}


def _outcomes(shards, processor) -> tuple[dict, list, Counter]:
    """Every raw sample's outcome ("trained" or its skip reason), the admitted examples, the shards cut."""
    outcome, admitted, cut = {}, [], Counter()
    for shard in shards:
        try:
            for key, files in iter_samples(shard):
                example, reason, _ = take(key, files, processor)
                outcome[key] = reason or "trained"
                if example is not None:
                    admitted.append((key, example))
        except (tarfile.TarError, OSError):
            cut["truncated_shard"] += 1
    return outcome, admitted, cut


def test_the_fuzzer_covers_every_mutation(fuzzed):
    truth = fuzzed[False]
    assert set(truth["samples"].values()) == set(MUTATIONS)
    assert set(truth["shards"].values()) == {"good", *SHARD_MUTATIONS}
    text = fuzzed[True]
    assert not set(text["samples"].values()) & IMAGE_MUTATIONS


@pytest.mark.parametrize("family", list(FAMILY_EXPECTED))
def test_every_fuzzed_sample_is_trained_on_or_skipped_by_reason(fuzzed, family):
    truth = fuzzed[family == "hf_text"]
    backbone = _backbone(family)
    processor = backbone.make_processor()
    outcome, admitted, cut = _outcomes(sorted(truth["shards"]), processor)
    assert cut["truncated_shard"] >= 1  # the cut shard, the one whose header checksum broke
    assert set(outcome.values()) <= {"trained", *SKIP_REASONS}
    whole = {k for k in truth["samples"] if truth["shards"][truth["shard_of"][k]] == "good"}
    expected = {**EXPECTED, **FAMILY_EXPECTED[family]}
    checked = 0
    for key in whole:
        want = expected.get(truth["samples"][key])
        if want is not None:
            assert outcome[key] in ({want} if isinstance(want, str) else want), (key, truth["samples"][key])
            checked += 1
    assert checked > 20 and "trained" in outcome.values()
    for key, example in admitted:  # no sample shows another's text
        texts = [it.text or "" for it in (example.query, example.positive, *example.negatives)]
        assert any(key in t for t in texts) or truth["samples"].get(key) in ("json_flip", None), key
    collate = ChunkCollate(processor, chunk_size=4, num_negatives=1)
    with torch.no_grad():
        for group in chunked([ex for _, ex in admitted], 4):
            batch = collate(group) if len(group) > 1 else collate(group + group)
            for chunk in batch.query_chunks + batch.candidate_chunks:
                out = backbone(chunk)
                assert torch.isfinite(out.hidden).all()
