"""``embedkit config show``: print the resolved config (recipe + overrides, every default filled in)."""

from __future__ import annotations

from embedkit.errors import UserError


def main(args: list[str]) -> int:
    from embedkit.config.loader import compose, to_yaml

    if not args or args[0] != "show":
        raise UserError("usage: embedkit config show [recipe=NAME] [key=value ...]")
    print(to_yaml(compose(args[1:])), end="")
    return 0
