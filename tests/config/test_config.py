"""The override grammar, recipe lookup and schema validation."""

import subprocess
import sys
import zipfile

import pytest
import yaml

from embedkit.cli import main as cli_main
from embedkit.config import loader
from embedkit.config.loader import apply_overrides, compose
from embedkit.errors import ConfigError
from tests.helpers.cli import REPO


def test_no_recipe_means_demo():
    cfg = compose([])
    assert cfg["recipe"] == "demo"
    assert cfg["model"]["backbone"]["name"] == "qwen2_vl"
    assert cfg["model"]["backbone"]["tiny"] is True  # from the recipe, not the default


def test_key_value_types_are_parsed_and_coerced():
    cfg = compose(["train.lr=3e-3", "trainer.max_steps=7", "model.normalize=false", "data.eval.datasets=[A,B]"])
    assert cfg["train"]["lr"] == pytest.approx(3e-3) and isinstance(cfg["train"]["lr"], float)
    assert cfg["trainer"]["max_steps"] == 7
    assert cfg["model"]["normalize"] is False
    assert cfg["data"]["eval"]["datasets"] == ["A", "B"]


def test_component_shorthand_replaces_block_with_defaults():
    cfg = compose(["loss=infonce"])
    # the demo recipe sets learnable_temperature: true; the shorthand resets to the defaults
    assert cfg["loss"] == {"name": "infonce", "temperature": 0.02, "learnable_temperature": False,
                           "bidirectional": False, "maxsim": "mean"}


def test_tilde_removes_a_key_so_the_default_applies():
    cfg = compose(["~trainer.max_steps"])
    assert cfg["trainer"]["max_steps"] == 1000
    assert compose([])["trainer"]["max_steps"] != 1000


def test_base_recipe_chain(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("base: demo\ntrain:\n  lr: 0.5\n")
    cfg = compose([f"recipe={child}"])
    assert cfg["train"]["lr"] == 0.5
    assert cfg["train"]["global_batch_size"] == 64  # inherited from demo
    assert cfg["recipe"] == "child"


@pytest.mark.parametrize(
    "override, key_in_message",
    [
        ("model.nonexistent=1", "model.nonexistent"),
        ("train.lr=fast", "train.lr"),
        ("loss=nosuchloss", "loss.name"),
        ("model.pooling.name=nope", "model.pooling.name"),
        ("loss.bogus=1", "loss.bogus"),
        ("train.optimizer=adam", "train.optimizer"),
        ("train.chunk_size=0", "train.chunk_size"),
        ("train.chunk_tokens=-1", "train.chunk_tokens"),
        ("data.train.num_workers=-2", "data.train.num_workers"),
    ],
)
def test_bad_config_names_the_key(override, key_in_message):
    with pytest.raises(ConfigError) as exc:
        compose([override])
    message = str(exc.value)
    assert message.startswith(key_in_message) and "\n" not in message


def test_every_bounded_key_exists_and_its_minimum_is_accepted():
    from embedkit.config.schema import MINIMUMS

    # keys that take effect only beside another setting (schema.INEFFECTIVE_OVERRIDES)
    enabling = {"model.lora.": "model.lora.enabled=true", "data.eval.muvera.": "data.eval.retrieval=muvera"}
    for key, low in MINIMUMS.items():
        cfg = compose([f"{key}={low}"] + [word for prefix, word in enabling.items() if key.startswith(prefix)])
        node = cfg
        for part in key.split("."):
            node = node[part]
        assert node == low, key


def test_unknown_component_lists_choices():
    with pytest.raises(ConfigError, match="choices: .*infonce"):
        compose(["loss=nosuchloss"])


def test_cli_config_error_exits_2_with_one_line(capsys):
    assert cli_main(["fit", "recipe=demo", "model.nonexistent=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.nonexistent" in err and "accepted" in err


def test_unknown_recipe_lists_available(capsys):
    assert cli_main(["config", "show", "recipe=nope"]) == 2
    assert "demo" in capsys.readouterr().err


def test_config_show_prints_resolved_yaml(capsys):
    assert cli_main(["config", "show", "train.lr=0.25"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["lr"] == 0.25 and shown["recipe"] == "demo"


def test_every_shipped_recipe_validates():
    names = loader.available_recipes()
    assert "demo" in names
    for name in names:
        compose([f"recipe={name}"])


def test_wheel_carries_the_recipes(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    wheel = next(tmp_path.glob("embedkit-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {p.stem for p in (REPO / "recipes").glob("*.yaml")}
    assert {n.rsplit("/", 1)[-1][:-5] for n in names if n.startswith("embedkit/recipes/")} >= shipped
    manifests = {p.name for p in (REPO / "data" / "mmeb").glob("*.yaml")}
    assert manifests and {n.rsplit("/", 1)[-1] for n in names if n.startswith("embedkit/manifests/")} >= manifests


def test_apply_overrides_does_not_mutate_input():
    raw = {"train": {"lr": 1.0}}
    apply_overrides(raw, ["train.lr=2"])
    assert raw == {"train": {"lr": 1.0}}


@pytest.mark.parametrize("override, recipe_text, fix", [
    ("trainer.max_steps=3", "trainer: {max_epochs: 1}", "trainer.max_epochs=0"),
    ("model.lora.r=4", "model: {lora: {enabled: false}}", "model.lora.enabled=true"),
    ("train.momentum=0.9", "train: {optimizer: adamw}", "train.optimizer=sgd"),
    ("train.betas=[0.9,0.98]", "train: {optimizer: sgd}", "train.optimizer=adamw"),
    ("train.min_lr_ratio=0.1", "train: {schedule: constant}", "train.schedule=cosine"),
    ("data.eval.muvera.candidates=7", "data: {eval: {retrieval: exact}}", "data.eval.retrieval=muvera"),
])
def test_an_override_that_cannot_take_effect_is_an_error(tmp_path, override, recipe_text, fix):
    """The recipe's other key decides that the override would be ignored: a one-line error naming both
    keys and the fix; with the fix the override applies; the recipe alone (no override) stays valid."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base: demo\n{recipe_text}\n")
    compose([f"recipe={recipe}"])
    key, _, text = override.partition("=")
    with pytest.raises(ConfigError, match=rf"^{key}=.*: cannot take effect while {fix.split('=')[0]}=") as err:
        compose([f"recipe={recipe}", override])
    assert "\n" not in str(err.value) and fix in str(err.value)
    node = compose([f"recipe={recipe}", override, fix])
    for part in key.split("."):
        node = node[part]
    assert node == yaml.safe_load(text)


def test_max_steps_beside_max_epochs_at_the_cli_exits_2_with_one_line(capsys):
    assert cli_main(["config", "show", "recipe=llave_2b", "trainer.max_steps=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "trainer.max_steps=3" in err and "trainer.max_epochs=1" in err
