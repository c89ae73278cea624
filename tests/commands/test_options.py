"""One options grammar for every verb (``embedkit/commands/_options.py``): ``--help`` generated from each
verb's declaration, the same value spellings everywhere, one-line errors naming the option. In-process:
``embedkit.cli.main`` with stdout/stderr captured."""

from __future__ import annotations

import re
import sys
import types
import typing
from typing import Literal

import pytest

from embedkit import cli
from embedkit.commands._options import Verb, describe
from embedkit.errors import UserError


def verb(name: str) -> Verb:
    return cli.verb_module(name).VERB


def undeclared(names) -> list[str]:
    """The verbs whose module has no ``VERB`` declaration."""
    return [n for n in names if not isinstance(getattr(cli.verb_module(n), "VERB", None), Verb)]


def run(capsys, words: list[str]) -> tuple[int, str, str]:
    code = cli.main(words)
    out, err = capsys.readouterr()
    return code, out, err


def test_every_verb_declares_its_options(monkeypatch):
    assert undeclared(cli.VERBS) == []
    assert [verb(n).name for n in cli.VERBS] == list(cli.VERBS)
    # the check can fail: a verb module without a declaration is reported
    monkeypatch.setitem(sys.modules, "embedkit.commands.planted", types.ModuleType("embedkit.commands.planted"))
    assert undeclared([*cli.VERBS, "planted"]) == ["planted"]


@pytest.mark.parametrize("name", cli.VERBS)
def test_help_lists_every_declared_option(name, capsys):
    decl = verb(name)
    code, out, err = run(capsys, [name, "--help"])
    assert code == 0 and err == ""
    assert out.startswith(f"usage: embedkit {decl.title()}")
    for opt in decl.declared():
        if opt.meta.get("config_words") or decl.fixed(opt):
            continue
        row = help_row_of(out, opt.word())
        assert row, (opt.word(), out)
        if not opt.required and not opt.meta.get("prefix"):
            assert "(default: " in row, row
    for word, _ in decl.words:
        assert help_row_of(out, word)
    if decl.config is not None:  # the config keys, from the schema, with their defaults
        from embedkit.commands._help import config_keys

        keys = [w for _, w, _ in config_keys()
                if any(p in ("", w.partition("=")[0]) or w.startswith(p + ".") for p in decl.config)]
        assert keys and [w for w in keys if not help_row_of(out, w)] == []
    assert run(capsys, [name, "-h"])[:2] == (0, out)


def help_row_of(out: str, word: str) -> str:
    """The help row of ``word`` (its line and the continuation lines under it), whitespace joined."""
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if line == f"  {word}" or line.startswith(f"  {word} "):
            rest = [li for li in lines[i + 1:]]
            block = [line] + rest[:next((k for k, li in enumerate(rest) if not li.startswith(" " * 20)), len(rest))]
            return " ".join(" ".join(block).split())
    return ""


def test_help_shows_defaults_and_schema_comments(capsys):
    out = run(capsys, ["export", "--help"])[1]
    assert "merge_lora=true|false" in out and "(default: true)" in out and "prompt.NAME=TEXT" in out
    out = run(capsys, ["fit", "--help"])[1]
    assert "resume=RUN_DIR" in out and "recipe=NAME|path.yaml" in out
    line = help_row_of(out, "train.chunk_size=64")
    assert "items encoded per forward pass" in line and ">= 1" in line  # its comment in schema.py, its minimum
    assert "one of cosine, linear, constant" in out  # a Literal's choices


def test_top_level_help_lists_every_verb_from_its_declaration(capsys):
    code, out, _ = run(capsys, ["--help"])
    assert code == 0
    for name in cli.VERBS:
        decl = verb(name)
        assert f"  {decl.title()}" in out and decl.summary in out
    assert "export       a run as a self-contained model folder: RUN_DIR|CKPT out=DIR" in out


def test_help_imports_nothing_heavy(monkeypatch, capsys):
    """``embedkit --help`` and every ``VERB --help`` answer without torch, Lightning or transformers: a
    fresh import of embedkit with those blocked still prints them."""
    for name in cli.VERBS:
        cli.main([name, "--help"])  # every module help needs is loaded here, so the restore below covers it
    capsys.readouterr()
    before = {m for m in sys.modules if m == "embedkit" or m.startswith("embedkit.")}
    for mod in before:
        monkeypatch.delitem(sys.modules, mod)
    for heavy in ("torch", "lightning", "transformers", "mlflow"):
        monkeypatch.setitem(sys.modules, heavy, None)  # `import torch` now raises ImportError
    try:
        import embedkit.cli as fresh

        assert fresh is not cli
        assert fresh.main(["--help"]) == 0
        for name in fresh.VERBS:
            assert fresh.main([name, "--help"]) == 0, name
        assert "usage: embedkit fit" in capsys.readouterr().out
    finally:  # the fresh copies go; monkeypatch puts the suite's modules back
        for mod in [m for m in sys.modules if (m == "embedkit" or m.startswith("embedkit.")) and m not in before]:
            del sys.modules[mod]


#: per verb: words with one wrong value, and the option the one-line error must name
WRONG = {
    "fit": (["train.chunk_size=0"], "train.chunk_size"),
    "eval": (["ckpt=x.ckpt", "rescore_k=0"], "rescore_k"),
    "data": (["mmeb", "src=a", "out=b", "shard_size=0"], "shard_size"),
    "compare": (["format=xml"], "format"),
    "ui": (["port=abc"], "port"),
    "config": (["show", "seed=abc"], "seed"),
    "recipes": (["colour=red"], "colour"),
    "export": (["run", "out=x", "dim=abc"], "dim"),
    "encode": (["model=m", "input=i.jsonl", "out=o.npy", "batch_size=0"], "batch_size"),
    "mine": (["model=m", "shards=s", "out=o", "num_negatives=2", "threshold=abc"], "threshold"),
    "teach": (["model=m", "shards=s", "out=o", "store_dtype=float64"], "store_dtype"),
    "merge": (["a", "b", "out=o", "density=abc"], "density"),
    "report": (["p.json", "results=r", "format=xml"], "format"),
}


def test_the_wrong_value_table_covers_every_verb():
    assert set(WRONG) == set(cli.VERBS)


@pytest.mark.parametrize("name", cli.VERBS)
def test_a_wrong_value_exits_2_with_one_line_naming_the_option(name, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    words, key = WRONG[name]
    code, out, err = run(capsys, [name, *words])
    assert code == 2 and out == "", out
    assert err.count("\n") == 1 and err.startswith("embedkit: error: ") and key in err, err


@pytest.mark.parametrize("name", [n for n in cli.VERBS if verb(n).config is None])
def test_an_unknown_option_names_the_accepted_ones(name, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    decl = verb(name)
    code, _, err = run(capsys, [name, *required_words(decl), "colour=red"])
    assert code == 2 and err.count("\n") == 1 and "unknown option 'colour'" in err, err
    keys = [o.key for o in decl.declared() if not (o.meta.get("positional") or o.meta.get("prefix"))]
    assert all(f"{k}=" in err for k in keys), err
    assert ("accepted: none" in err) == (not keys)


def test_a_config_verb_names_the_accepted_keys(capsys):
    code, _, err = run(capsys, ["config", "show", "model.colour=red"])
    assert code == 2 and err.count("\n") == 1 and "model.colour" in err and "accepted: " in err and "pooling" in err


# -- the same spellings in every verb -------------------------------------------------------------


def sample(tp) -> str:
    """A valid value of type ``tp`` as it is written on the command line."""
    tp = typing.get_args(tp)[0] if typing.get_origin(tp) is typing.Union else tp
    if typing.get_origin(tp) is Literal:
        return str(typing.get_args(tp)[0])
    if typing.get_origin(tp) is list:
        return f"[{sample(typing.get_args(tp)[0])}]"
    return {int: "3", float: "0.5", bool: "true"}.get(tp, "x")


#: words some options need beside them (rescore=true needs binary codes to rescore)
CONTEXT = {"eval": ["quantize=binary"]}


def required_words(decl: Verb) -> list[str]:
    """The verb's required words, with valid values (two for a list of positionals)."""
    words = list(CONTEXT.get(decl.name, []))
    for opt in (o for o in decl.declared() if o.required):
        if opt.meta.get("positional"):
            words += ["x", "y"] if opt.is_list else [sample(opt.base)]
        else:
            words.append(f"{opt.key}={sample(opt.base)}")
    return words


#: spellings every option of a type accepts (value as written -> value parsed); the config reads the same
SPELLINGS = {
    bool: {"true": True, "false": False, "yes": True, "no": False, "True": True},
    int: {"3": 3, "12": 12},
    float: {"1e-5": 1e-5, "0.5": 0.5, "2": 2.0, "3.0e-4": 3e-4},
    list[int]: {"[1,2]": [1, 2], "[3, 4]": [3, 4], "5,6": [5, 6]},
    list[float]: {"[1,2]": [1.0, 2.0], "[0.5,1e-5]": [0.5, 1e-5], "7": [7.0]},
    list[str]: {"[a,b]": ["a", "b"], "a,b": ["a", "b"], "c": ["c"]},
}
REFUSED = {bool: ["1", "0", "maybe"], int: ["abc", "1.5", "1e-5", "true", "[1,2]"], float: ["abc", "true"],
           list[int]: ["[a,b]", "[1.5]"], list[float]: ["[a]", "x"]}


def typed_options():
    """(verb, option) for every option of a plain type, over all verbs."""
    for name in cli.VERBS:
        decl = verb(name)
        for opt in decl.declared():
            if opt.base in SPELLINGS and not any(opt.meta.get(k) for k in ("positional", "prefix", "config_words")):
                yield name, opt


def test_every_typed_option_is_covered():
    kinds = {opt.base for _, opt in typed_options()}
    assert {bool, int, float, list[int], list[float], list[str]} <= kinds, kinds


@pytest.mark.parametrize("name, opt", list(typed_options()), ids=lambda x: getattr(x, "key", x))
def test_the_same_spellings_in_every_verb(name, opt):
    decl = verb(name)
    base = required_words(decl)
    low = opt.meta.get("minimum")
    for text, value in SPELLINGS[opt.base].items():
        if low is not None and any(v < low for v in (value if isinstance(value, list) else [value])):
            continue
        parsed = getattr(decl.parse([*base, f"{opt.key}={text}"]), opt.name)
        assert type(parsed) is type(value), (name, opt.key, text, parsed)
        assert (parsed == pytest.approx(value)) if opt.base in (float, list[float]) else parsed == value
    for text in REFUSED.get(opt.base, []):
        with pytest.raises(UserError, match="^" + re.escape(f"{opt.key}: expected {describe(opt.base, low)}")):
            decl.parse([*base, f"{opt.key}={text}"])


def test_the_config_reads_the_same_spellings(capsys):
    code, out, _ = run(capsys, ["config", "show", "train.lr=1e-5", "model.normalize=no", "train.betas=[0.9,0.99]",
                                "data.eval.datasets=[a,b]", "trainer.max_steps=3"])
    assert code == 0
    assert "lr: 1.0e-05" in out and "normalize: false" in out and "max_steps: 3" in out
    assert "- 0.99" in out and "- b" in out


# -- the grammar's parts --------------------------------------------------------------------------


def test_data_mmeb_old_flags_still_work_with_one_deprecation_line(capsys):
    decl = verb("data")
    new = decl.parse(["mmeb", "src=/s", "out=/o", "subsets=[A,B]", "shard_size=3", "cap=5"])
    assert capsys.readouterr().err == ""
    old = decl.parse(["mmeb", "--src", "/s", "--out=/o", "--subsets", "A", "B", "--shard-size", "3", "--cap", "5"])
    assert old == new
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--src, --out, --subsets, --shard-size, --cap are deprecated" in err
    assert "src=, out=, subsets=, shard_size=, cap=" in err
    with pytest.raises(UserError, match="^data: --src needs a value"):
        decl.parse(["mmeb", "--src"])


def test_compare_format_and_plot_take_both_spellings(capsys):
    decl = verb("compare")
    assert decl.parse(["--format", "csv", "--plot=p.png"]) == decl.parse(["format=csv", "plot=p.png"])
    assert capsys.readouterr().err == ""  # aliases, not deprecated
    with pytest.raises(UserError, match="^format: expected one of markdown, csv, got 'xml'"):
        decl.parse(["--format", "xml"])


def test_list_options_add_up_and_positionals_fill_in_order():
    opts = verb("compare").parse(["metric=a", "metrics=[b,c]", "metric=d"])
    assert opts.metrics == ["a", "b", "c", "d"]
    opts = verb("merge").parse(["r1", "r2", "r3", "out=o", "weights=[1,2,3]"])
    assert opts.runs == ["r1", "r2", "r3"] and opts.weights == [1.0, 2.0, 3.0]
    opts = verb("export").parse(["run", "out=o", "prompt.query=Find: this", "prompt.doc=a,b"])
    assert opts.source == "run" and opts.prompts == {"query": "Find: this", "doc": "a,b"}  # text as written
    opts = verb("mine").parse(required_words(verb("mine")) + ["judge=embedding", "judge.temperature=0.05"])
    assert opts.judge_block() == {"name": "embedding", "temperature": "0.05"}


def test_messages_for_the_kinds_of_mistake():
    cases = [
        (["export", "run"], "export: give out=DIR"),
        (["export", "run", "s", "out=o"], "export: unexpected 's'"),
        (["export", "run", "out="], "out: give a value"),
        (["ui", "port=70000"], "port: must be <= 65535, got 70000"),
        (["mine", "model=m", "shards=s", "out=o", "num_negatives=2", "window=[5,2]"], "window: expected [first rank"),
        (["mine", "model=m", "shards=s", "out=o", "num_negatives=2", "window=[0,2]"], "window: must be >= 1, got 0"),
        (["eval", "ckpt=x", "quantize=int8", "rescore=true"], "rescore: rescoring applies to binary codes"),
        (["eval", "ckpt=x", "quantize=[int8,pq]"], "quantize: expected one of binary, int8, or a list of them"),
        (["data", "xyz", "src=a", "out=b"], "dataset: expected one of mmeb, mmeb-v2, got 'xyz'"),
        (["config", "list"], "action: expected one of show, got 'list'"),
        (["config"], "config: give show"),
    ]
    for (name, *words), msg in cases:
        with pytest.raises(UserError) as err:
            verb(name).parse(words)
        assert str(err.value).startswith(msg) and "\n" not in str(err.value), (words, str(err.value))


def test_declared_choices_match_the_library():
    """A Literal in a declaration repeats a tuple of the library (kept light for --help): they agree."""
    from embedkit.backbones.base import DTYPE_NAMES
    from embedkit.data.mmeb import SPLITS
    from embedkit.eval.quantize import MODES
    from embedkit.export.merge import METHODS

    def choices(name, key):
        opt = next(o for o in verb(name).declared() if o.key == key)
        tp = opt.base
        tp = typing.get_args(tp)[0] if typing.get_origin(tp) is list else tp
        return typing.get_args(tp)

    assert choices("eval", "quantize") == choices("encode", "quantize") == MODES
    assert choices("data", "split") == SPLITS
    assert choices("merge", "method") == METHODS
    assert set(choices("export", "dtype")) == set(DTYPE_NAMES)


def test_a_closed_pipe_ends_a_verb_quietly(monkeypatch, capsys):
    """``embedkit recipes | head``: the reader closes the pipe; no traceback, exit 141 (128 + SIGPIPE)."""
    from embedkit import cli
    from embedkit.commands import recipes

    def closed(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(recipes, "main", closed)
    assert cli.main(["recipes"]) == 141
    assert "Traceback" not in capsys.readouterr().err
