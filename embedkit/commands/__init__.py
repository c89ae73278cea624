"""The verbs of the ``embedkit`` command, one module each: ``main(args: list[str]) -> int``.

Only these modules parse command-line words; each reads the config once and hands every builder
its section (or the parts built from it).
"""
