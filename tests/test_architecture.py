"""The house rules, checked on the source: layers import downwards only, no package cycles, no import
circle between files, only ``embedkit/commands/`` (and the verb table) parses command-line words, every
package ships in the wheel. docs/architecture.md draws it."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "embedkit"

#: bottom to top; a module may import its own layer's packages (without cycles) and those below
LAYERS = [
    {"errors", "files", "console", "version", "runs", "fault_points"},
    {"config"},
    {"data", "backbones", "pooling", "losses"},
    {"distributed", "encoder", "inference", "rows"},
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


def file_imports(module: str, path: Path, modules) -> list[tuple[str, int]]:
    """The embedkit files ``module`` imports anywhere (lazy imports too), as (module, line). An import
    names a file: ``import embedkit.x.y`` and ``from embedkit.x import y`` (y a submodule) are edges to
    ``embedkit.x.y``; ``from embedkit.x import name`` to ``embedkit.x`` (its ``__init__`` or ``x.py``)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] == "embedkit"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != "embedkit":
                continue
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for name in names:
            while name not in modules and "." in name:  # a name inside a module: the module
                name = name.rpartition(".")[0]
            if name in modules and name != module:
                found.append((name, node.lineno))
    return found


def reachable(graph: dict[str, dict], start: str) -> set[str]:
    """Every node a path of one or more edges leads to from ``start``."""
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def file_cycles() -> list[str]:
    """Each group of files that import each other around a circle (the files on a circle and every
    file that both reaches and is reached by them), with the imports inside it: ``a:line -> b``."""
    modules = source_modules()
    graph = {m: {} for m in modules}
    for module, path in modules.items():
        for target, line in file_imports(module, path, modules):
            graph[module].setdefault(target, line)
    reach = {m: reachable(graph, m) for m in graph}
    groups = {tuple(sorted(w for w in reach[m] if m in reach[w])) for m in graph if m in reach[m]}
    return [" <-> ".join(g) + ": " + ", ".join(f"{a}:{graph[a][b]} -> {b}" for a in g for b in sorted(graph[a])
                                               if b in g)
            for g in sorted(groups)]


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


def test_no_import_circle_between_files():
    """No two files import each other, directly or around a circle, lazy imports included: a circle
    hides an order of initialisation and usually a concept in the wrong file."""
    cycles = file_cycles()
    assert not cycles, "\n".join(cycles)


def test_the_file_circle_check_sees_a_planted_circle(tmp_path, monkeypatch):
    """The file rule can fail: two files importing each other (one lazily, one through
    ``from package import module``) are reported as one circle, and nothing else is."""
    planted = tmp_path / "embedkit"
    (planted / "data").mkdir(parents=True)
    (planted / "__init__.py").write_text("")
    (planted / "data" / "__init__.py").write_text("")
    (planted / "data" / "a.py").write_text("def f():\n    from embedkit.data.b import g\n")
    (planted / "data" / "b.py").write_text("from embedkit.data import a\n\n\ndef g():\n    pass\n")
    (planted / "data" / "c.py").write_text("import embedkit.data.a\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", planted)
    assert file_cycles() == ["embedkit.data.a <-> embedkit.data.b: embedkit.data.a:2 -> embedkit.data.b, "
                             "embedkit.data.b:1 -> embedkit.data.a"]


def test_every_package_ships_in_the_wheel():
    """pyproject.toml lists the packages by hand (the recipes are mapped in from outside): a package
    missing from the list would be missing from an installed embedkit."""
    text = (PACKAGE.parent / "pyproject.toml").read_text()
    listed = set(re.findall(r'"(embedkit(?:\.\w+)*)"', re.search(r"^packages = \[(.*?)\]", text, re.M | re.S).group(1)))
    packages = {".".join(p.parent.relative_to(PACKAGE.parent).parts) for p in PACKAGE.rglob("__init__.py")}
    assert packages - listed == set(), f"add to pyproject.toml's packages: {sorted(packages - listed)}"
    assert {p for p in listed - packages if p not in ("embedkit.recipes", "embedkit.manifests")} == set()


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
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", planted)
    graph = package_graph()
    assert graph == {"data": {"training": ["embedkit.data.bad:2"]}}


#: the run directory's file names, spelt only by ``embedkit/runs.py``; the shard set's manifest, read only by
#: ``embedkit/data/shard_set.py``
OWNED_NAMES = {"config.yaml": "runs", "last.ckpt": "runs", "mlflow_run_id": "runs", "checkpoints": "runs",
               ".lock": "runs", "manifest.json": "data.shard_set"}


def docstring_nodes(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def spelt_names(module: str, path: Path) -> list[str]:
    """``module:line name`` for each owned artifact name or ``.parent.parent`` walk in code (docstrings aside)."""
    tree = ast.parse(path.read_text())
    docs = docstring_nodes(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            for name, owner in OWNED_NAMES.items():
                # "checkpoints" is also an English word: only a path component counts
                hit = (re.search(r"(^checkpoints$)|(checkpoints/)|(/checkpoints\b)", node.value) if name == "checkpoints"
                       else name in node.value)
                if hit and module != f"embedkit.{owner}":
                    found.append(f"{module}:{node.lineno} {name}")
        if (isinstance(node, ast.Attribute) and node.attr == "parent" and isinstance(node.value, ast.Attribute)
                and node.value.attr == "parent" and module != "embedkit.runs"):
            found.append(f"{module}:{node.lineno} .parent.parent")
    return found


def test_artifact_names_are_spelt_by_their_owners_only():
    """The run dir's layout belongs to ``runs.RunDir``, ``manifest.json`` to ``data.shard_set.ShardSet``."""
    found = [hit for module, path in source_modules().items() for hit in spelt_names(module, path)]
    assert not found, "\n".join(found)


def test_the_artifact_check_sees_a_planted_spelling(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('"""Reads config.yaml (a docstring may say so)."""\n'
                   'def f(run):\n    return run / "checkpoints" / "last.ckpt", run.parent.parent\n')
    assert sorted(spelt_names("embedkit.export.bad", bad)) == [
        "embedkit.export.bad:3 .parent.parent", "embedkit.export.bad:3 checkpoints", "embedkit.export.bad:3 last.ckpt"]
    assert spelt_names("embedkit.runs", bad) == []


#: the orchestrators a newcomer reads first: each a short list of named steps (longer work lives in the
#: functions they call)
SHORT_FUNCTIONS = {("commands/fit.py", "Fit.run"): 40, ("commands/eval.py", "main"): 40,
                   ("export/writer.py", "export_model"): 40}


def function_lengths(path: Path) -> dict[str, int]:
    """``name`` / ``Class.name`` -> its length in lines, for every function of the file."""
    out = {}
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    out[f"{node.name}.{item.name}"] = item.end_lineno - item.lineno + 1
        elif isinstance(node, ast.FunctionDef):
            out.setdefault(node.name, node.end_lineno - node.lineno + 1)
    return out


def test_the_orchestrators_stay_short_and_no_complexity_waiver():
    long = [f"{file}:{name} is {n} lines (at most {limit})" for (file, name), limit in SHORT_FUNCTIONS.items()
            for n in [function_lengths(PACKAGE / file)[name]] if n > limit]
    waivers = [f"{path.relative_to(PACKAGE)}:{i}" for path in PACKAGE.rglob("*.py")
               for i, line in enumerate(path.read_text().splitlines(), 1) if "noqa: C901" in line]
    assert not long and not waivers, "\n".join(long + [f"complexity waiver at {w}" for w in waivers])


def test_the_length_check_measures(tmp_path):
    planted = tmp_path / "f.py"
    planted.write_text("class Fit:\n    def run(self):\n" + "        x = 1\n" * 45)
    assert function_lengths(planted)["Fit.run"] == 46
