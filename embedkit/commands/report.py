"""``embedkit report``: a run's MMEB-V2 scores beside a published score file, without a new eval run.

    embedkit report PUBLISHED.json results=RUN_OUT|results.json [protocol=mmeb_v2@v2.0.0|FILE.yaml]
                    [our_protocol=FILE.yaml] [format=markdown|json] [out=FILE]

PUBLISHED is a VLM2Vec per-model score file (``experiments/public/all_scores/<version>/<model>.json``);
``results`` is the output folder of ``embedkit eval benchmark=mmeb_v2`` (its ``mmeb_v2/results.json``)
or that file. ``protocol``: the published file's protocol (default: guessed from the file: v2.1 without
the -doc OOD tasks, else v2.0.0 when MomentSeeker has 1,800 queries, else v2.0.1). The table and its
reading: ``embedkit.eval.mmeb_v2.report`` and docs/mmeb-v2.md ("Reading a gap").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from embedkit.commands._options import Verb, option


@dataclass
class ReportOptions:
    published: str = option(help="a published per-task score file (VLM2Vec's JSON format)", positional=True,
                            metavar="PUBLISHED.json")
    results: str = option(help="the run's eval output folder (holding mmeb_v2/results.json) or that file",
                          metavar="DIR|FILE")
    protocol: Optional[str] = option(None, "the published file's protocol: mmeb_v2@VERSION or a protocol "
                                           "YAML; null: guessed from the file", metavar="SPEC|FILE")
    our_protocol: Optional[str] = option(None, "the protocol file the run used, when its results do not "
                                               "embed the pins and it was not a shipped version", metavar="FILE")
    format: Literal["markdown", "json"] = option("markdown", "the table's format")
    out: Optional[str] = option(None, "also write the table to this file", metavar="FILE")


VERB = Verb("report", "a run's MMEB-V2 scores beside a published score file, pin by pin", ReportOptions)


def main(args: list[str]) -> int:
    opts = VERB.parse(args)
    from embedkit.eval.mmeb_v2.report import report_text, write_report

    text = report_text(opts.results, opts.published, opts.protocol, opts.our_protocol, opts.format)
    print(text, end="")
    if opts.out:
        write_report(opts.out, text)
    return 0
