"""``embedkit merge``: merge runs of one base into a new run dir.

    embedkit merge RUN_A RUN_B [...] out=DIR [method=average|slerp|ties] [weights=[1,1]]
                   [density=0.2] [scale=1.0]

RUN is a run dir (its newest checkpoint) or a checkpoint file. The runs must share their ``model``
section (else one line naming the first key that differs). ``out`` becomes a run dir that ``embedkit
eval model=DIR``, ``embedkit export DIR`` and ``embedkit.load(DIR)`` read. The
methods and their formulas: ``embedkit/export/merge.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from embedkit.commands._options import Verb, option


@dataclass
class MergeOptions:
    runs: list[str] = option(help="the runs to merge: run dirs or checkpoints of one base", positional=True,
                             metavar="RUN")
    out: str = option(help="the run dir to write", metavar="DIR")
    method: Literal["average", "slerp", "ties"] = option("average", "how the weights are combined")
    weights: Optional[list[float]] = option(None, "one weight per run; null: equal weights")
    density: float = option(0.2, "ties: the fraction of each run's changes kept")
    scale: float = option(1.0, "ties: the merged change's scale")
    trust_checkpoint: bool = option(False, "read a checkpoint you trust with the full unpickler (it may run code "
                                           "from the file); default: weights and embedkit's own states only")


VERB = Verb("merge", "merge runs of one base into a new run dir", MergeOptions)


def main(args: list[str]) -> int:
    opts = VERB.parse(args)
    from embedkit.export.merge import merge_runs

    merge_runs(opts.runs, opts.out, method=opts.method, weights=opts.weights, density=opts.density,
               scale=opts.scale, trust_checkpoint=opts.trust_checkpoint, log=lambda m: print(m, flush=True))
    print(f"evaluate: embedkit eval model={opts.out} data.eval.root=...; "
          f"export: embedkit export {opts.out} out=...", flush=True)
    return 0
