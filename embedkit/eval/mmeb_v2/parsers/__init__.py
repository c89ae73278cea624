"""One parser per MMEB-V2 dataset family: ``parse(pin, root) -> CorpusTask`` (``parsers/common.py`` says
what the task holds). ``PARSERS`` maps a pin's ``parser`` field to its function."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from embedkit.eval.corpus_tasks import CorpusTask
from embedkit.eval.mmeb_v2.parsers import image, qa, video, visdoc
from embedkit.eval.mmeb_v2.parsers.common import MissingData

PARSERS: dict[str, Callable] = {
    "image": image.image,
    "ssv2": video.ssv2,
    "video_classification": video.video_classification,
    **{name: video.video_retrieval for name in video.RETRIEVAL},
    "moment_retrieval": video.moment_retrieval,
    "momentseeker": video.momentseeker,
    **{name: qa.video_qa for name in qa.FORMATS},
    "vidore": visdoc.visdoc,
    "visrag": visdoc.visdoc,
}


def parse(pin, root: str | Path) -> CorpusTask:
    """The task ``pin`` names, read from ``root``; ``MissingData`` naming what is missing."""
    if pin.parser not in PARSERS:
        raise MissingData([f"no parser {pin.parser!r} (known: {', '.join(PARSERS)})"])
    return PARSERS[pin.parser](pin, Path(root))


__all__ = ["PARSERS", "MissingData", "parse"]
