"""``embedkit recipes``: the shipped recipes as a table, read from the resolved recipes themselves.

Columns: name, backbone (family: checkpoint), trainable parameters (an estimate from the config),
contrastive batch (examples one loss call sees, all ranks) / examples per optimizer step, run length,
and the MMEB score the recipe reproduces (its ``paper.mmeb``; "-" where it has none).
"""

from __future__ import annotations

from embedkit.commands._options import Verb

VERB = Verb("recipes", "list the shipped recipes")


def trainable(model: dict) -> str:
    lora, backbone = model["lora"], model["backbone"]
    if lora["enabled"]:
        kind = "DoRA" if lora["dora"] else "LoRA"
        return f"{kind} r={lora['r']}" + (" +vision" if lora["vision"] else "")
    parts = ["full LM"]
    if backbone.get("train_projector"):
        parts.append("projector")
    if backbone.get("freeze_vision") is False:
        parts.append("vision")
    return " + ".join(parts)


def row(name: str, cfg: dict) -> list[str]:
    model, train, trainer, paper = cfg["model"], cfg["train"], cfg["trainer"], cfg["paper"]
    backbone = model["backbone"]
    source = backbone.get("path") or ("tiny" if backbone.get("tiny") else "path required")
    batch = train["global_batch_size"]
    steps = f"{trainer['max_epochs']} epoch" if trainer["max_epochs"] else str(trainer["max_steps"])
    score = "-" if paper["mmeb"] is None else f"{paper['mmeb']:.1f}"
    return [name, f"{backbone['name']}: {source}", trainable(model),
            f"{batch} / {batch * train['accumulate_steps']}", steps, score]


def main(args: list[str]) -> int:
    VERB.parse(args)  # it takes no options: a word here is a mistake to report
    from embedkit.config.loader import available_recipes, compose

    header = ["recipe", "backbone", "trainable", "batch: loss / step", "steps", "MMEB (paper)"]
    rows = [header] + [row(name, compose([f"recipe={name}"])) for name in available_recipes()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    return 0
