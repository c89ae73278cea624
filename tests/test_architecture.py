"""The house rules, checked on the source: layers import downwards only, no package cycles, only
``embedkit/commands/`` (and the verb table) parses command-line words. docs/architecture.md draws it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "embedkit"

#: bottom to top; a module may import its own layer's packages (without cycles) and those below
LAYERS = [
    {"errors", "files", "console", "version", "runs"},
    {"config"},
    {"data", "backbones", "pooling", "losses"},
    {"distributed", "encoder"},
    {"training", "eval", "tracking", "export", "mining"},
    {"commands"},
    {"cli", "__main__", "__init__"},
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
ARGV_PARSERS = {"commands", "cli"}


def unit(module: str) -> str:
    """``embedkit.training.module`` -> ``training``; ``embedkit`` itself -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def source_modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(module: str, path: Path) -> list[tuple[str, int]]:
    """Every embedkit module imported anywhere in the file (lazy imports inside functions too)."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "embedkit"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.split(".")[0] == "embedkit":
                found.append((name, node.lineno))
    return found


def package_graph() -> dict[str, dict[str, list[str]]]:
    """unit -> imported unit -> ["module:line", ...]."""
    graph: dict[str, dict[str, list[str]]] = {}
    for module, path in source_modules().items():
        src = unit(module)
        for target, line in imports_of(module, path):
            dst = unit(target)
            if dst != src:
                graph.setdefault(src, {}).setdefault(dst, []).append(f"{module}:{line}")
    return graph


def test_every_unit_has_a_layer():
    units = {unit(m) for m in source_modules()}
    assert units <= set(LAYER), f"units without a layer in this test (and docs/architecture.md): {units - set(LAYER)}"


def test_no_package_imports_a_layer_above_it():
    upward = [f"{src} (layer {LAYER[src]}) imports {dst} (layer {LAYER[dst]}) at {', '.join(where)}"
              for src, targets in package_graph().items() for dst, where in targets.items()
              if LAYER[dst] > LAYER[src]]
    assert not upward, "\n".join(upward)


def test_no_import_cycle_between_packages():
    graph = {src: set(targets) for src, targets in package_graph().items()}
    cycles = []

    def visit(node, stack):
        for nxt in sorted(graph.get(node, ())):
            if nxt in stack:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif len(stack) < len(LAYER):
                visit(nxt, stack + [nxt])

    for start in sorted(graph):
        visit(start, [start])
    assert not cycles, "\n".join(sorted(set(cycles)))


def test_training_and_eval_do_not_import_each_other():
    graph = package_graph()
    assert "eval" not in graph.get("training", {}), graph["training"]["eval"]
    assert "training" not in graph.get("eval", {}), graph["eval"]["training"]


def test_only_commands_parse_the_command_line():
    offenders = []
    for module, path in source_modules().items():
        if unit(module) in ARGV_PARSERS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if "argparse" in names:
                    offenders.append(f"{module}:{node.lineno} imports argparse")
            if isinstance(node, ast.Attribute) and node.attr == "argv" and getattr(node.value, "id", "") == "sys":
                offenders.append(f"{module}:{node.lineno} reads sys.argv")
    assert not offenders, "\n".join(offenders)


def test_the_checker_sees_a_planted_upward_import(tmp_path, monkeypatch):
    """The rules above can fail: a data module importing training is reported."""
    planted = tmp_path / "embedkit"
    (planted / "data").mkdir(parents=True)
    (planted / "training").mkdir()
    (planted / "__init__.py").write_text("")
    (planted / "data" / "__init__.py").write_text("")
    (planted / "training" / "__init__.py").write_text("")
    (planted / "data" / "bad.py").write_text("def f():\n    from embedkit.training import module\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", planted)
    graph = package_graph()
    assert graph == {"data": {"training": ["embedkit.data.bad:2"]}}
