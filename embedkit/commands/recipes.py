"""``embedkit recipes``: the shipped recipes, one name a line."""

from __future__ import annotations


def main(args: list[str]) -> int:
    from embedkit.config.loader import available_recipes

    print("\n".join(available_recipes()))
    return 0
