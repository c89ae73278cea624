"""Checkpoint loading has one home: every backbone family loads through ``embedkit.backbones.checkpoints``,
no family keeps its own copy of the file helpers, and the shared loading code names no family.

The rules are checked on the source (like ``tests/test_architecture.py``); each checker is also run on a
planted offender to prove it can fail.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

BACKBONES = Path(__file__).resolve().parents[2] / "embedkit" / "backbones"
CHECKPOINTS = BACKBONES / "checkpoints"
LOADING = "embedkit.backbones.checkpoints"
#: the loading helpers; a definition of one outside the loading package is a second dialect
HELPERS = {"check_path", "local_file", "local_dir", "read_json", "read_config", "read_safetensors", "key_error",
           "load_tokenizer", "read_tokenizer", "load_mapped", "check_model_type", "load_pretrained",
           "read_adapter", "merge_adapter", "_checkpoint_dir", "_load_weights"}
#: what reads checkpoint files; imported only by the loading package (writing, ``save_file``, is the family's)
READERS = {"huggingface_hub"}
READER_NAMES = {"load_file", "safe_open", "AutoConfig", "AutoModel", "AutoTokenizer", "snapshot_download",
                "cached_file", "no_init_weights"}


def family_modules() -> dict[str, Path]:
    """Built-in backbone name -> the file its loading is defined in: its class's, or for a family that
    inherits its constructor (``qwen2_5_vl`` from ``qwen2_vl``) the file of the class defining it
    (components other tests register in this process, defined outside ``embedkit.backbones``, are not
    families of the package)."""
    from embedkit.config import registry

    factories = {name: registry.get("backbone", name).factory for name in registry.choices("backbone")}
    return {name: Path(inspect.getfile(_constructor_owner(f))) for name, f in factories.items()
            if f.__module__.startswith("embedkit.backbones.")}


def _constructor_owner(cls: type) -> type:
    """The class in ``cls``'s MRO whose own ``__init__`` it runs."""
    return next((c for c in cls.__mro__ if "__init__" in vars(c)), cls)


def loads_through_the_package(source: str) -> bool:
    """Does the module import (a name from) ``embedkit.backbones.checkpoints``?"""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(LOADING):
            return True
        if isinstance(node, ast.Import) and any(a.name.startswith(LOADING) for a in node.names):
            return True
    return False


def own_loading(source: str) -> list[str]:
    """Loading done outside the package: helper definitions, checkpoint-reading imports."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in HELPERS:
            found.append(f"defines {node.name} (line {node.lineno})")
        elif isinstance(node, ast.ImportFrom):
            names = {a.name for a in node.names}
            if (node.module or "") in READERS or names & READER_NAMES:
                found.append(f"imports {node.module}: {sorted(names)} (line {node.lineno})")
        elif isinstance(node, ast.Import) and any(a.name.split(".")[0] in READERS | {"safetensors"} for a in node.names):
            found.append(f"imports {[a.name for a in node.names]} (line {node.lineno})")
    return found


def family_tests(source: str, families: set[str]) -> list[str]:
    """Comparisons against a family name (``family == "llava_onevision"``): the shared code must not branch
    on the family; families pass what differs."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                for const in ast.walk(side):
                    if isinstance(const, ast.Constant) and const.value in families:
                        found.append(f"compares with {const.value!r} (line {node.lineno})")
    return found


def test_every_family_loads_through_the_checkpoints_package():
    families = family_modules()
    assert {"qwen2_vl", "llava_onevision", "phi3_v", "hf_text"} <= set(families)
    offenders = [f"{name} ({path.name})" for name, path in families.items()
                 if not loads_through_the_package(path.read_text())]
    assert not offenders, offenders
    assert not loads_through_the_package("from embedkit.backbones.base import Backbone\n")  # can fail


def test_no_backbone_module_outside_the_package_reads_checkpoints_itself():
    offenders = {str(p.relative_to(BACKBONES)): own_loading(p.read_text())
                 for p in sorted(BACKBONES.rglob("*.py")) if CHECKPOINTS not in p.parents}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, offenders
    planted = ("from safetensors.torch import load_file\n"
               "def _load_weights(root):\n    return load_file(root)\n"
               "def read_safetensors(root, stem):\n    from transformers import AutoModel\n")
    assert len(own_loading(planted)) == 4  # can fail


def test_the_shared_loading_code_names_no_family():
    families = set(family_modules())
    shared = [CHECKPOINTS / "__init__.py", CHECKPOINTS / "files.py", CHECKPOINTS / "peft.py"]
    offenders = {p.name: family_tests(p.read_text(), families) for p in shared}
    assert not any(offenders.values()), offenders
    assert family_tests('if family == "llava_onevision":\n    pass\n', families)  # can fail
