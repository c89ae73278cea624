"""The shipped MMEB-V2 protocol files: task counts and groups per version, the pins that differ between
versions, fingerprints that move with every pin, and one-line errors for bad specs and files."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from embedkit.errors import UserError
from embedkit.eval.mmeb_v2 import protocol as P

GROUP_SIZES = {"I-CLS": 10, "I-QA": 10, "I-RET": 12, "I-VG": 4, "V-CLS": 5, "V-QA": 5, "V-RET": 5, "V-MRET": 3,
               "ViDoRe-V1": 10, "ViDoRe-V2": 4, "VisRAG": 6}


@pytest.mark.parametrize("version,total,ood", [("v2.0.0", 78, 4), ("v2.0.1", 78, 4), ("v2.1", 76, 2)])
def test_each_version_has_its_tasks_and_groups(version, total, ood):
    proto = P.load_protocol(f"mmeb_v2@{version}")
    assert (proto.benchmark, proto.version, len(proto.tasks)) == ("mmeb_v2", version, total)
    assert proto.source == str(P.PROTOCOL_DIR / f"{version}.yaml")
    sizes = {g: len(n) for g, n in proto.groups().items()}
    assert sizes == {**GROUP_SIZES, "OOD": ood}
    assert {m: len(n) for m, n in proto.modalities().items()} == {"image": 36, "video": 18, "visdoc": 20 + ood}


def test_metric_and_scope_follow_the_modality_and_the_eval_configs():
    proto = P.load_protocol("mmeb_v2@v2.0.0")
    for pin in proto.tasks:
        assert pin.metric == ("ndcg_linear@5" if pin.modality == "visdoc" else "hit@1"), pin.name
        assert pin.pixels == {"min_pixels": 3136, "max_pixels": 1003520}
        assert (pin.frames is not None) == (pin.modality == "video"), pin.name
    local = {p.name for p in proto.tasks if p.scope == "local" and p.modality == "video"}
    assert local == {"SmthSmthV2", "MVBench", "Video-MME", "NExTQA", "EgoSchema", "ActivityNetQA",
                     "QVHighlight", "Charades-STA", "MomentSeeker"}
    assert all(p.scope == "global" for p in proto.tasks if p.modality == "visdoc")
    assert all(p.scope == "local" and p.query_instruction is None for p in proto.tasks if p.modality == "image")


def test_the_versions_differ_where_upstream_changed():
    v0, v1, v21 = (P.load_protocol(f"mmeb_v2@{v}") for v in ("v2.0.0", "v2.0.1", "v2.1"))
    assert v0.task("MomentSeeker").num_queries == 1800 and v1.task("MomentSeeker").num_queries == 1602
    assert v0.task("ViDoSeek-page").dataset["hf_path"] == "VLM2Vec/ViDoSeek-page"
    assert v21.task("ViDoSeek-page").dataset["hf_path"] == "VLM2Vec/ViDoSeek-page-fixed"
    assert "MMLongBench-doc" in v1.names() and "MMLongBench-doc" not in v21.names()
    assert len({v0.fingerprint(), v1.fingerprint(), v21.fingerprint()}) == 3
    same = [n for n in v21.names() if v21.task(n).fingerprint() != v1.task(n).fingerprint()]
    assert same == ["ViDoSeek-page", "MMLongBench-page"]


def test_instruction_strings_are_the_loaders_exact_text():
    proto = P.load_protocol("mmeb_v2@v2.1")
    assert proto.task("MSR-VTT").query_instruction == "Find a video that contains the following visual content:"
    assert proto.task("Breakfast").query_instruction.endswith("in the video. ")  # trailing space upstream
    assert proto.task("K700").candidate_instruction == ""
    assert proto.task("VisRAG_PlotQA").dataset["split"] == "train"
    assert proto.task("MomentSeeker").extra["query_instruction_video"].startswith("Find the clip")


@pytest.mark.parametrize("change", [
    ("query_instruction", "Find a video:"), ("frames", {"num_frames": 16, "sampling": "uniform_index", "max_saved": 64}),
    ("pixels", {"min_pixels": 3136, "max_pixels": 602112}), ("num_queries", 999), ("scope", "local"),
    ("dataset", {"hf_path": "VLM2Vec/MSR-VTT", "config": "test_1k", "split": "test", "revision": "abc", "files": {}}),
])
def test_changing_any_pin_changes_the_task_and_protocol_fingerprints(change):
    proto = P.load_protocol("mmeb_v2@v2.1")
    pin = proto.task("MSR-VTT")
    changed = dataclasses.replace(pin, **{change[0]: change[1]})
    assert changed.fingerprint() != pin.fingerprint()
    other = dataclasses.replace(proto, tasks=tuple(changed if t is pin else t for t in proto.tasks))
    assert other.fingerprint() != proto.fingerprint()
    assert dataclasses.replace(pin).fingerprint() == pin.fingerprint()


def test_an_edited_copy_loads_and_comments_do_not_move_the_fingerprint(tmp_path):
    text = (P.PROTOCOL_DIR / "v2.1.yaml").read_text()
    (tmp_path / "copy.yaml").write_text("# a comment of mine\n" + text)
    assert P.protocol_from_file(tmp_path / "copy.yaml").fingerprint() == P.load_protocol().fingerprint()
    doc = yaml.safe_load(text)
    doc["tasks"][40]["frames"]["num_frames"] = 16
    (tmp_path / "edited.yaml").write_text(yaml.safe_dump(doc))
    edited = P.protocol_from_file(tmp_path / "edited.yaml")
    assert edited.fingerprint() != P.load_protocol().fingerprint()
    assert edited.tasks[40].frames["num_frames"] == 16


def test_bad_specs_and_files_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match="known are v2.0.0, v2.0.1, v2.1"):
        P.load_protocol("mmeb_v2@v9")
    with pytest.raises(UserError, match="unknown benchmark"):
        P.load_protocol("mmeb_v3")
    with pytest.raises(UserError, match="no task 'Nope'"):
        P.load_protocol().task("Nope")
    doc = yaml.safe_load((P.PROTOCOL_DIR / "v2.1.yaml").read_text())
    doc["tasks"][3]["metric"] = "hit@5"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(UserError, match="task VOC2007: metric 'hit@5'"):
        P.protocol_from_file(tmp_path / "bad.yaml")
    del doc["tasks"][3]["scope"]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(UserError, match=r"missing \['scope'\]"):
        P.protocol_from_file(tmp_path / "bad.yaml")
    with pytest.raises(UserError, match="not found"):
        P.protocol_from_file(tmp_path / "none.yaml")
