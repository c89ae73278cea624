"""The verbs of the ``embedkit`` command, one module each: ``VERB`` (its options, declared once with
``_options.option``; ``embedkit VERB --help`` is generated from it) and ``main(args: list[str]) -> int``.

Only these modules parse command-line words, all with the one grammar of ``_options.py``; each reads
the config once and hands every builder its section (or the parts built from it).
"""
