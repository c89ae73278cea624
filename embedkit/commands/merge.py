"""``embedkit merge``: merge runs of one base into a new run dir.

    embedkit merge RUN_A RUN_B [...] out=DIR [method=average|slerp|ties] [weights=[1,1]]
                   [density=0.2] [scale=1.0]

RUN is a run dir (its newest checkpoint) or a checkpoint file. The runs must share their ``model``
section (else one line naming the first key that differs). ``out`` becomes a run dir that ``embedkit
eval model=DIR``, ``embedkit export DIR`` and ``embedkit.load(DIR)`` read. The
methods and their formulas: ``embedkit/export/merge.py``.
"""

from __future__ import annotations

from embedkit.errors import UserError

KEYS = ("out", "method", "weights", "density", "scale")


def parse(args: list[str]) -> tuple[list[str], dict]:
    import yaml

    runs, opts = [], {}
    for arg in args:
        key, eq, value = arg.partition("=")
        if not eq:
            runs.append(arg)
            continue
        if key not in KEYS:
            raise UserError(f"merge: unknown argument {arg!r}; arguments: RUN ... {' '.join(k + '=' for k in KEYS)}")
        if key in ("weights", "density", "scale"):
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError:
                parsed = None
            ok = (isinstance(parsed, list) and all(isinstance(w, (int, float)) for w in parsed)) if key == "weights" \
                else isinstance(parsed, (int, float))
            if not ok:
                want = "a list of numbers, e.g. [0.5,0.5]" if key == "weights" else "a number"
                raise UserError(f"{key}: expected {want}, got {value!r}")
            value = parsed
        opts[key] = value
    if "out" not in opts:
        raise UserError("merge: give out=DIR (embedkit merge RUN_A RUN_B ... out=DIR)")
    return runs, opts


def main(args: list[str]) -> int:
    runs, opts = parse(args)
    from embedkit.export.merge import merge_runs

    merge_runs(runs, opts["out"], method=opts.get("method", "average"), weights=opts.get("weights"),
               density=float(opts.get("density", 0.2)), scale=float(opts.get("scale", 1.0)),
               log=lambda m: print(m, flush=True))
    print(f"evaluate: embedkit eval model={opts['out']} data.eval.root=...; "
          f"export: embedkit export {opts['out']} out=...", flush=True)
    return 0
