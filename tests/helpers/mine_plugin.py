"""A test plugin judge (loaded by name: ``plugins=[tests.helpers.mine_plugin]``): cosine of a fixed embedding table
looked up by the items' text, the same numbers the fixture's fixed-table encoder gives."""

import torch

from embedkit.config.registry import register
from embedkit.mining.judges.base import Judge

TABLE: dict[str, torch.Tensor] = {}  # text -> unit vector; filled by the test


@register("judge", "fixed_table")
class FixedTableJudge(Judge):
    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def score(self, pairs):
        q = torch.stack([TABLE[it.text] for it in pairs.queries()])
        c = torch.stack([TABLE[it.text] for it in pairs.candidates()])
        return self.scale * (q.double() * c.double()).sum(-1)
