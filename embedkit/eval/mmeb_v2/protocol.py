"""The MMEB-V2 protocol as data: one YAML file per benchmark version pins every task.

Each task (``TaskPin``) pins what decides its score: group, metric, candidate scope, query count, the
instruction strings of both sides, the frame policy, the pixel caps and the dataset (HF path, config,
split, revision, file hashes). The files live in ``protocols/<version>.yaml`` (every value's source in a
comment there; the facts are collected in the research note on MMEB-V2 and come from
TIGER-AI-Lab/VLM2Vec's eval configs, loaders and released score files).

Fingerprints: a task's is the sha256 of the canonical JSON (sorted keys, no spaces) of all its fields;
the protocol's is the sha256 of the canonical JSON of benchmark, version and the ordered task
fingerprints. So changing any pin (an instruction, a frame count, a pixel cap, a revision) changes the
task's fingerprint and the protocol's; comments and key order in the YAML do not.

Conventions: an instruction ``None`` means "taken from each row" (the MMEB-V1 image tasks carry theirs
in the data); ``""`` means no instruction (bare text: class labels, QA options). ``revision`` ``None``
means unpinned. ``extra`` holds task-specific pins that do not fit the common fields (MomentSeeker's
per-input-kind query instructions, MVBench's configs); it is part of the fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import yaml

from embedkit.errors import UserError

BENCHMARK = "mmeb_v2"
#: the version ``benchmark=mmeb_v2`` means: the newest upstream release (fixed OOD page datasets, 76
#: tasks); the paper's 78-task numbers are ``mmeb_v2@v2.0.0`` (docs/mmeb-v2.md, "Versions")
DEFAULT_VERSION = "v2.1"
PROTOCOL_DIR = Path(__file__).resolve().parent / "protocols"

MODALITIES = ("image", "video", "visdoc")
METRICS = ("hit@1", "ndcg_linear@5")
SCOPES = ("local", "global")
#: the leaderboard's groups per modality, in its column order (VLM2Vec report_score_v2.py, paper Table 5)
GROUPS = {
    "image": ("I-CLS", "I-QA", "I-RET", "I-VG"),
    "video": ("V-CLS", "V-QA", "V-RET", "V-MRET"),
    "visdoc": ("ViDoRe-V1", "ViDoRe-V2", "VisRAG", "OOD"),
}


def canonical_json(value) -> str:
    """The one JSON text a value hashes as: sorted keys, no whitespace, non-ASCII kept."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_of(value) -> str:
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class TaskPin:
    """One task's pins (field meanings: module docstring and docs/mmeb-v2.md)."""

    name: str
    modality: str
    group: str
    parser: str
    metric: str
    scope: str
    num_queries: int
    query_instruction: str | None
    candidate_instruction: str | None
    frames: dict | None
    pixels: dict
    dataset: dict
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    def fingerprint(self) -> str:
        """sha256 hex of the canonical JSON of every field."""
        return sha256_of(self.as_dict())


@dataclass(frozen=True)
class Protocol:
    """A benchmark version: its tasks in leaderboard order."""

    benchmark: str
    version: str
    tasks: tuple[TaskPin, ...]
    source: str = ""

    def fingerprint(self) -> str:
        """sha256 hex over benchmark, version and every task's fingerprint (in order)."""
        return sha256_of({"benchmark": self.benchmark, "version": self.version,
                          "tasks": [t.fingerprint() for t in self.tasks]})

    def task(self, name: str) -> TaskPin:
        for pin in self.tasks:
            if pin.name == name:
                return pin
        raise UserError(f"{self.benchmark}@{self.version} has no task {name!r} "
                        f"(it has {len(self.tasks)}: {', '.join(t.name for t in self.tasks[:5])}, ...)")

    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def groups(self) -> dict[str, list[str]]:
        """group -> task names, groups and tasks in file order."""
        out: dict[str, list[str]] = {}
        for pin in self.tasks:
            out.setdefault(pin.group, []).append(pin.name)
        return out

    def modalities(self) -> dict[str, list[str]]:
        """modality -> task names, in file order."""
        out: dict[str, list[str]] = {}
        for pin in self.tasks:
            out.setdefault(pin.modality, []).append(pin.name)
        return out

    def header(self) -> dict:
        """What every result file and MLflow run records about the protocol."""
        return {"benchmark": self.benchmark, "version": self.version, "fingerprint": self.fingerprint()}

    def to_dict(self) -> dict:
        """The header plus every task's pins: what a results file embeds, so a report can name the pins
        of the protocol a run used even when it was an edited copy (``protocol_from_dict`` reads it)."""
        return {**self.header(), "tasks": [t.as_dict() for t in self.tasks]}


def known_versions() -> list[str]:
    return sorted(p.stem for p in PROTOCOL_DIR.glob("*.yaml"))


def load_protocol(spec: str = BENCHMARK) -> Protocol:
    """``"mmeb_v2"`` (the default version) or ``"mmeb_v2@v2.1"`` -> the shipped protocol of that version.
    An unknown benchmark or version is a ``UserError`` naming the known ones."""
    benchmark, _, version = spec.partition("@")
    if benchmark != BENCHMARK:
        raise UserError(f"unknown benchmark {benchmark!r}: known is {BENCHMARK} (versions {', '.join(known_versions())})")
    version = version or DEFAULT_VERSION
    path = PROTOCOL_DIR / f"{version}.yaml"
    if not path.is_file():
        raise UserError(f"unknown {BENCHMARK} version {version!r}: known are {', '.join(known_versions())}")
    return protocol_from_file(path)


def protocol_from_file(path) -> Protocol:
    """A protocol YAML (a shipped one or a user's edited copy) -> ``Protocol``; a missing file, bad YAML or
    a task with a missing or invalid pin is a one-line ``UserError`` naming the file and the task."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"protocol file {path} not found")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"protocol file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if isinstance(doc, dict) and "version" not in doc:
        doc["version"] = path.stem
    return replace(protocol_from_dict(doc, f"protocol file {path}"), source=str(path))


def protocol_from_dict(doc: dict, where: str = "protocol in results") -> Protocol:
    """``Protocol.to_dict()`` output (or a parsed protocol YAML) -> ``Protocol``, validated as a file is."""
    if not isinstance(doc, dict) or not isinstance(doc.get("tasks"), list) or not doc["tasks"]:
        raise UserError(f"{where}: needs benchmark, version and a non-empty tasks list")
    tasks = tuple(_task(entry, where, i) for i, entry in enumerate(doc["tasks"]))
    names = [t.name for t in tasks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"{where}: task names repeated: {', '.join(dupes)}")
    return Protocol(str(doc.get("benchmark", BENCHMARK)), str(doc.get("version", "?")), tasks, where)


_REQUIRED = [f.name for f in fields(TaskPin) if f.name != "extra"]
_DATASET_KEYS = ("hf_path", "config", "split", "revision")


def _task(entry, where: str, index: int) -> TaskPin:
    label = entry.get("name", f"#{index}") if isinstance(entry, dict) else f"#{index}"
    if not isinstance(entry, dict):
        raise UserError(f"{where}: task {label} is not a mapping")
    unknown = sorted(set(entry) - set(_REQUIRED) - {"extra"})
    missing = [k for k in _REQUIRED if k not in entry]
    if missing or unknown:
        raise UserError(f"{where}: task {label}: missing {missing or '-'}, unknown keys {unknown or '-'}")
    pin = TaskPin(**{**entry, "extra": entry.get("extra") or {}})
    problem = _check(pin)
    if problem:
        raise UserError(f"{where}: task {label}: {problem}")
    return pin


def _check(pin: TaskPin) -> str:
    """The first thing wrong with a pin, or ''."""
    checks = [
        (pin.modality in MODALITIES, f"modality {pin.modality!r} not one of {MODALITIES}"),
        (pin.group in GROUPS.get(pin.modality, ()), f"group {pin.group!r} not one of {GROUPS.get(pin.modality)}"),
        (pin.metric in METRICS, f"metric {pin.metric!r} not one of {METRICS}"),
        (pin.scope in SCOPES, f"scope {pin.scope!r} not one of {SCOPES}"),
        (isinstance(pin.num_queries, int) and pin.num_queries > 0, "num_queries must be a positive integer"),
        (isinstance(pin.pixels, dict), "pixels must be a mapping"),
        (pin.frames is None or isinstance(pin.frames, dict), "frames must be a mapping or null"),
        (isinstance(pin.dataset, dict) and all(k in pin.dataset for k in _DATASET_KEYS),
         f"dataset needs {', '.join(_DATASET_KEYS)}"),
    ]
    return next((msg for ok, msg in checks if not ok), "")
