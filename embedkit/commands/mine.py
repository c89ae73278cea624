"""``embedkit mine``: hard negatives for every example of a set of shards, mined with a trained model.

    embedkit mine model=RUN_DIR|EXPORT|CKPT shards=SRC out=DST num_negatives=K
                  [window=[30,100]] [threshold=0.95] [judge=embedding] [judge.PARAM=VALUE ...]
                  [pick=top|random] [seed=0] [batch_size=32] [device=cpu|cuda] [plugins=[mod,...]]

Each source folder of SRC (an MMEB subset) is encoded, its queries retrieve their top targets, the
rank window is kept, duplicates of the positive and the judge's false negatives (score above
``threshold`` x the positive's) are dropped, and DST gets the same shards with K mined negatives and
their scores per example, plus DST/manifest.json (provenance). Re-run after an interruption, it
resumes; with the same inputs, the bytes are the same. Train on it with
``embedkit fit data.train.shards=DST data.train.num_negatives=K``. See ``embedkit/mining/miner.py``.
"""

from __future__ import annotations

from pathlib import Path

from embedkit.errors import UserError

KEYS = ("model", "shards", "out", "num_negatives", "window", "threshold", "judge", "pick", "seed", "batch_size",
        "device", "plugins")
INTS = ("num_negatives", "seed", "batch_size")


def _list(key: str, value: str) -> list[str]:
    value = value.strip()
    if not (value.startswith("[") and value.endswith("]")):
        raise UserError(f"{key}: expected a list like [a,b], got {value!r}")
    return [v.strip() for v in value[1:-1].split(",") if v.strip()]


def _window(value: str) -> list[int]:
    try:
        lo, hi = (int(v) for v in _list("window", value))
    except ValueError:
        raise UserError(f"window: expected [first rank, last rank], e.g. [30,100], got {value!r}") from None
    if not 1 <= lo <= hi:
        raise UserError(f"window: ranks are 1-based and first <= last, got [{lo},{hi}]")
    return [lo, hi]


def _threshold(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise UserError(f"threshold: expected a number, got {value!r}") from None


def _pick(value: str) -> str:
    if value not in ("top", "random"):
        raise UserError(f"pick: {value!r} is not accepted; choices: top, random")
    return value


PARSERS = {"window": _window, "threshold": _threshold, "pick": _pick}


def parse(args: list[str]) -> dict:
    opts: dict = {"window": [30, 100], "threshold": 0.95, "judge": {"name": "embedding"}, "pick": "top", "seed": 0,
                  "batch_size": 32, "plugins": []}
    judge_params: dict = {}
    for arg in args:
        key, eq, value = arg.partition("=")
        if eq and key.startswith("judge."):
            judge_params[key[len("judge."):]] = value
            continue
        if not eq or key not in KEYS:
            raise UserError(f"mine: unknown argument {arg!r}; arguments: {', '.join(k + '=' for k in KEYS)}, judge.PARAM=")
        if key in INTS:
            try:
                opts[key] = int(value)
            except ValueError:
                raise UserError(f"{key}: expected an integer, got {value!r}") from None
            if opts[key] < (0 if key == "seed" else 1):
                raise UserError(f"{key}: must be >= {0 if key == 'seed' else 1}, got {value}")
        elif key in PARSERS:
            opts[key] = PARSERS[key](value)
        elif key == "judge":
            opts["judge"] = {"name": value}
        elif key == "plugins":
            opts[key] = _list(key, value)
        else:
            opts[key] = value
    opts["judge"].update(judge_params)
    missing = [k for k in ("model", "shards", "out", "num_negatives") if k not in opts]
    if missing:
        raise UserError(f"mine: give {', '.join(k + '=' for k in missing)} "
                        "(embedkit mine model=RUN_DIR shards=SRC out=DST num_negatives=K)")
    return opts


def sources(spec: str, out: str) -> tuple[dict[str, list[tuple[str, str]]], Path]:
    """{subset: [(shard, path relative to the source root)]} of ``spec``, and the root."""
    from embedkit.data.shards import list_shards
    from embedkit.data.stream import group_shards

    root = Path(spec).expanduser()
    if not root.is_dir():
        raise UserError(f"shards: {spec} is not a folder of .tar shards")
    shards = [s for s in list_shards(root) if ".mine" not in Path(s).relative_to(root).parts]
    if not shards:
        raise UserError(f"shards: no .tar shards found at {spec}")
    if Path(out).expanduser().resolve() == root.resolve():
        raise UserError("out: must differ from shards= (mined shards are new files)")
    return ({name: [(s, str(Path(s).relative_to(root))) for s in group]
             for name, group in group_shards(shards).items()}, root)


def build_judge(block: dict, plugins: list[str]):
    from embedkit.config import registry, schema
    from embedkit.errors import ConfigError

    try:
        registry.load_plugins(plugins)
        return registry.build("judge", schema._component("judge", block, "embedding", "judge"))
    except ConfigError as exc:
        raise UserError(str(exc)) from None


def main(args: list[str]) -> int:
    opts = parse(args)
    src, root = sources(opts["shards"], opts["out"])
    judge = build_judge(opts["judge"], opts["plugins"])
    from embedkit.export.reader import ENCODER_KINDS, open_model
    from embedkit.files import write_atomic
    from embedkit.mining import provenance
    from embedkit.mining.miner import Miner, MineSettings

    log = lambda m: print(m, flush=True)  # noqa: E731
    log(f"mine: model {opts['model']}")
    encoder, model = open_model(opts["model"], kinds=ENCODER_KINDS)
    if opts.get("device"):
        encoder.to(opts["device"])
    settings = MineSettings(num_negatives=opts["num_negatives"], window=tuple(opts["window"]),
                            threshold=opts["threshold"], pick=opts["pick"], seed=opts["seed"],
                            batch_size=opts["batch_size"])
    stats = Miner(encoder, judge, src, opts["out"], settings, log=log).run()
    mining = {
        "source": str(root.resolve()),
        "source_shards": {rel: provenance.file_sha256(s) for group in src.values() for s, rel in group},
        "model": str(Path(opts["model"]).expanduser().resolve()),
        "model_sha256": provenance.model_sha256(model),
        "judge": {**opts["judge"], **judge.describe()}, "plugins": opts["plugins"],
        "window": list(opts["window"]), "threshold": opts["threshold"], "num_negatives": opts["num_negatives"],
        "pick": opts["pick"], "seed": opts["seed"],
    }
    manifest = provenance.build_manifest(stats, mining)
    write_atomic(Path(opts["out"]) / provenance.MANIFEST, provenance.dumps(manifest))
    m = manifest["mining"]
    log(f"mine: done: {sum(s['count'] for s in manifest['subsets'].values())} examples, {m['kept']} negatives "
        f"kept of {m['considered']} in the window; dropped {m['dropped']['duplicate']} duplicates, "
        f"{m['dropped']['false_negative']} false negatives; {m['short']} examples short of "
        f"{opts['num_negatives']}; manifest {Path(opts['out']) / provenance.MANIFEST}")
    return 0
