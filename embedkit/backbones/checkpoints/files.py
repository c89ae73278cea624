"""The bottom of checkpoint loading: reading a checkpoint folder's files, with one-line errors.

Every loader above (``checkpoints.load_pretrained``, the foreign layouts ``llava_qwen`` and ``peft``,
the families built in-project) reads through these helpers, so a user mistake reads the same whichever
family meets it: ``model.backbone.path: <what is wrong> (<first line of the cause>)``.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from embedkit.errors import UserError


def first_line(exc: Exception) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def supported_families() -> str:
    """Every registered backbone name (the families a user can pick)."""
    from embedkit.config import registry

    return ", ".join(registry.choices("backbone"))


def check_path(path: str | None, family: str) -> str:
    """``path`` as a loader takes it: an expanded local folder, or a hub id left as it is."""
    if not path:
        raise UserError(f"model.backbone.path: required for {family} unless model.backbone.tiny=true")
    local = Path(path).expanduser()
    looks_local = path.startswith((".", "/", "~")) or local.exists()
    if looks_local and not local.is_dir():
        raise UserError(f"model.backbone.path: {path} does not exist")
    return str(local) if looks_local else path


def local_file(path: str, name: str) -> Optional[Path]:
    """``name`` inside a local folder or a hub id's cached snapshot; None when it is not there."""
    root = Path(path).expanduser()
    if root.is_dir():
        return root / name if (root / name).is_file() else None
    try:
        from transformers.utils import cached_file

        found = cached_file(path, name, _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
    except (OSError, ValueError):
        return None
    return Path(found) if found else None


def local_dir(path: str) -> Path:
    """The folder holding ``path``'s files: the folder itself, or a hub id's snapshot."""
    root = Path(path).expanduser()
    if root.is_dir():
        return root
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path))
    except (OSError, ValueError) as exc:
        raise UserError(f"model.backbone.path: cannot fetch {path} ({first_line(exc)})") from None


def read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"model.backbone.path: {file} is not valid JSON ({exc})") from None


def read_config(path: str) -> dict:
    """``config.json`` of a folder or hub id, as saved (any ``model_type``, known to transformers or not)."""
    file = local_file(path, "config.json")
    if file is None:
        raise UserError(f"model.backbone.path: cannot read a model config from {path} (no config.json)")
    return read_json(file)


def check_model_type(config: dict, path: str, family: str, accepted: tuple[str, ...]) -> None:
    """Refuse a checkpoint of another model type, naming its type and the families there are."""
    if config.get("model_type") not in accepted:
        raise UserError(
            f"model.backbone.path: {path} holds a {config.get('model_type')!r} model, not {family} "
            f"(types {', '.join(accepted)}); supported families: {supported_families()}"
        )


def read_safetensors(root: Path, stem: str) -> dict[str, torch.Tensor]:
    """Every tensor of ``<stem>.safetensors`` or of the shards its ``.index.json`` lists."""
    from safetensors.torch import load_file

    index = root / f"{stem}.safetensors.index.json"
    if index.is_file():
        files = sorted(set(read_json(index)["weight_map"].values()))
    elif (root / f"{stem}.safetensors").is_file():
        files = [f"{stem}.safetensors"]
    else:
        raise UserError(f"model.backbone.path: {root} has no {stem}.safetensors(.index.json)")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(root / f)))
    return out


def key_error(root, what: str, unmatched: list[str], missing: list[str]) -> UserError:
    """A checkpoint whose keys do not fit the module: the first few of each kind, on one line."""
    parts = []
    if unmatched:
        parts.append(f"{len(unmatched)} unmatched (unexpected) keys {unmatched[:3]}")
    if missing:
        parts.append(f"{len(missing)} missing keys {missing[:3]}")
    return UserError(f"model.backbone.path: {root} does not match the {what} layout ({'; '.join(parts)})")


def load_mapped(module: torch.nn.Module, raw: dict[str, torch.Tensor], map_key: Callable[[str], Optional[str]],
                *, root, what: str, source_key: Callable[[str], str] = lambda key: key) -> None:
    """Load checkpoint tensors ``raw`` into ``module`` under the names ``map_key`` gives (None: dropped),
    strictly: a key that names no weight is reported as saved (unmatched), a weight no key fills under the
    checkpoint's own name (``source_key``, the inverse map)."""
    expected = set(module.state_dict())
    state, unmatched = {}, []
    for key, value in raw.items():
        name = map_key(key)
        if name is None:
            continue
        if name in expected:
            state[name] = value
        else:
            unmatched.append(key)
    missing = sorted(source_key(k) for k in expected - set(state))
    if unmatched or missing:
        raise key_error(root, what, sorted(unmatched), missing)
    module.load_state_dict(state, strict=True)


def load_tokenizer(path: str):
    """The tokenizer saved at ``path``, as saved.

    ``AutoTokenizer`` swaps a saved generic fast tokenizer (``tokenizer_class: TokenizersBackend``) for
    the model type's own class when it deems the declared class wrong (e.g. ``Qwen2Tokenizer`` for
    ``qwen2``), which rebuilds a different pipeline from the vocabulary: a tiny word-level tokenizer
    saved and loaded back then splits words into characters (docs/bugs-and-fixes.md).
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cfg = local_file(path, "tokenizer_config.json")
    if cfg is not None and read_json(cfg).get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def read_tokenizer(path: str):
    """``load_tokenizer`` with a one-line error naming the folder."""
    try:
        return load_tokenizer(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"model.backbone.path: cannot load the tokenizer of {path} ({first_line(exc)})") from None


def load_error(path: str, family: str, exc: Exception) -> UserError:
    return UserError(f"model.backbone.path: cannot load {family} checkpoint {path} ({first_line(exc)})")


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Allocate parameters in ``dtype`` directly (a 4B model in bf16 never exists in float32)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


@contextlib.contextmanager
def empty_weights(dtype: torch.dtype) -> Iterator[None]:
    """Build modules in ``dtype`` without random initialisation: a checkpoint fills every weight next."""
    from transformers.initialization import no_init_weights

    with no_init_weights(), default_dtype(dtype):
        yield
