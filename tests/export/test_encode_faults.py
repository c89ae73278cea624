"""``encode`` under a full disk: one line naming the part, the parts before it kept (no temporary), and
the same command resumes to the bytes of an uninterrupted run."""

import json

import pytest
import torch

from embedkit import fault_points
from embedkit.errors import UserError
from embedkit.export.corpus import encode_file


class Fake:
    """An encoder whose embedding of a text is its length and its first character."""

    def encode_items(self, items, batch_size=32, dim=None, **batching):
        return torch.tensor([[float(len(it.text)), float(ord(it.text[0]))] for it in items])


def test_a_full_disk_while_writing_a_part_is_one_line_and_a_rerun_resumes(tmp_path, monkeypatch):
    fault_points.reset()
    corpus = tmp_path / "rows.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"row {i}" * (i + 1)}) + "\n" for i in range(10)))
    encode_file(Fake(), corpus, tmp_path / "whole.npy", part_size=3, log=lambda m: None)

    out = tmp_path / "cut.npy"
    monkeypatch.setenv(fault_points.PLAN_ENV, "encode_part:3:enospc")
    with pytest.raises(UserError) as info:
        encode_file(Fake(), corpus, out, part_size=3, log=lambda m: None)
    parts = tmp_path / "cut.npy.parts"
    assert str(info.value) == (f"disk full writing {parts / 'part-000000006.npy'}; the parts written before it are "
                               "kept; free space and run the same command again to resume")
    assert sorted(p.name for p in parts.iterdir()) == ["part-000000000.npy", "part-000000003.npy", "run.json"]
    monkeypatch.delenv(fault_points.PLAN_ENV)
    lines = []
    encode_file(Fake(), corpus, out, part_size=3, log=lines.append)
    assert lines[0] == "encode: resuming, 2 of 4 parts already written"
    assert out.read_bytes() == (tmp_path / "whole.npy").read_bytes() and not parts.exists()
