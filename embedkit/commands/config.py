"""``embedkit config show``: print the resolved config (recipe + overrides, every default filled in)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from embedkit.commands._options import Verb, config_words, option


@dataclass
class ConfigShowOptions:
    action: Literal["show"] = option(help="print the resolved config", positional=True, key="action",
                                     metavar="show")
    overrides: list[str] = config_words()


VERB = Verb("config", "print the resolved config", ConfigShowOptions, config=("",))


def main(args: list[str]) -> int:
    opts = VERB.parse(args)
    from embedkit.config.loader import compose, to_yaml

    print(to_yaml(compose(opts.overrides)), end="")
    return 0
