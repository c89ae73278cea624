"""tracking/lineage.py: the chain line, the MLflow tags of a run with parents, a run dir's lineage (its
file, else a leaf named for the run), a checkpoint's."""

from embedkit.runs import RunDir
from embedkit.tracking import lineage


def test_chain_and_tags():
    one = lineage.node("one", "/r/one", "fit", 3)
    two = lineage.node("two", "/r/two", "fit init_from", parents=[one])
    merged = lineage.node("m", "/r/m", "merge average", parents=[two, one])
    assert lineage.chain(one) == "one" and lineage.chain(two) == "one -> two"
    assert lineage.chain(merged) == "(one -> two + one) -> m"
    assert lineage.tags(one) == {}
    assert lineage.tags(merged) == {lineage.PARENT_TAG: "/r/two,/r/one", lineage.LINEAGE_TAG: "(one -> two + one) -> m"}


def test_a_run_dirs_lineage_is_its_file_else_a_leaf(tmp_path):
    run = RunDir(tmp_path / "run")
    run.write_config("run:\n  name: stage-a\n")
    leaf = lineage.of_run(run, step=7)
    assert (leaf["name"], leaf["how"], leaf["step"], leaf["parents"]) == ("stage-a", "fit", 7, [])
    tree = lineage.node("stage-a", run.path, "fit init_from", parents=[lineage.node("p", "/p", "fit")])
    lineage.write(run, tree)
    assert lineage.of_run(run) == tree
    ckpt = run.step_checkpoint(2)
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")
    assert lineage.of_source(ckpt) == tree
    assert lineage.of_source(tmp_path / "loose.ckpt")["name"] == "loose.ckpt"
