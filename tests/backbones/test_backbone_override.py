"""Switching the backbone by name on the command line drops the previous family's keys."""

from embedkit.config.loader import compose


def test_backbone_name_override_replaces_the_block():
    cfg = compose(["recipe=demo", "model.backbone.name=llava_onevision", "model.backbone.tiny=true"])
    assert cfg["model"]["backbone"]["name"] == "llava_onevision"
    assert cfg["model"]["backbone"]["tiny"] is True
    assert "min_pixels" not in cfg["model"]["backbone"]  # the demo recipe's qwen2_vl key is gone
    same = compose(["recipe=demo", "model.backbone.name=qwen2_vl"])  # same name: the block is kept
    assert same["model"]["backbone"]["max_pixels"] == 3136
