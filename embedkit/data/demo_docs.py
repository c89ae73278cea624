"""Procedurally drawn document pages for the visual-document demo, with queries and graded qrels.

A page holds several regions stacked top to bottom: a block of text-like marks (dark bars in
lines, standing for words), a coloured shape (the image demo's colours and shapes) and a small table
grid, the shape either above or below the table, and a second block of marks at the bottom. A page's
``PageSpec`` is what a query can name: "a page with a red triangle above a table of 3 columns". The
marks, the table's row count and all sizes and offsets are jitter that no query names, so a model
must read the named regions, not memorise pixels.

Qrels are graded (the grades ``embedkit.eval.ranking.ndcg_at_k`` takes): 2 for the page a query was
made from, 1 for a page that shares one of the two halves of its description (the same object, i.e.
colour and shape, or the same table, i.e. place and column count), 0 for the rest. Specs are unique
within a corpus, so a grade-1 page matches exactly one half. Deterministic in the seed / ``rng``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from embedkit.data.demo import COLOURS, SHAPES, _draw_shape
from embedkit.errors import UserError

PLACES = ("above", "below")  # the shape's place relative to the table
COLUMNS = (2, 3, 4)
MIN_SIZE, MAX_SIZE = 48, 512
INK = (45, 45, 45)


@dataclass(frozen=True)
class PageSpec:
    """What a query names on a page: the object's colour and shape, its place and the table's columns."""

    colour: str
    shape: str
    place: str
    columns: int

    def object_part(self) -> tuple:
        return (self.colour, self.shape)

    def table_part(self) -> tuple:
        return (self.place, self.columns)


@dataclass(frozen=True)
class DocCorpus:
    """``pages`` (images) and their ``specs``; ``queries`` (texts), ``query_pages`` (the page index
    each query was made from) and ``qrels`` {query text: {page index: grade}} in query order, so
    ``list(qrels.values())`` is ranking's qrels for a [queries, pages] score matrix."""

    pages: list
    specs: list
    queries: list
    query_pages: list
    qrels: dict


def all_specs() -> list[PageSpec]:
    """Every spec: 6 colours x 5 shapes x 2 places x 3 column counts = 180."""
    return [PageSpec(c, s, p, n) for c in COLOURS for s in SHAPES for p in PLACES for n in COLUMNS]


def page_queries(spec: PageSpec) -> list[str]:
    """The query texts of ``spec``: the same description phrased from the object and from the table."""
    inverse = "below" if spec.place == "above" else "above"
    obj, table = f"a {spec.colour} {spec.shape}", f"a table of {spec.columns} columns"
    return [f"a page with {obj} {spec.place} {table}", f"a page with {table} {inverse} {obj}"]


def grade(query_spec: PageSpec, page_spec: PageSpec) -> int:
    """2: the same description; 1: the same object or the same table (place and columns); else 0."""
    if query_spec == page_spec:
        return 2
    same_obj = query_spec.object_part() == page_spec.object_part()
    return 1 if same_obj or query_spec.table_part() == page_spec.table_part() else 0


def _page_size(size) -> tuple[int, int]:
    w, h = (size, size) if isinstance(size, int) else tuple(size)
    if not (MIN_SIZE <= w <= MAX_SIZE and MIN_SIZE <= h <= MAX_SIZE):
        raise UserError(f"demo page size must be in [{MIN_SIZE}, {MAX_SIZE}] pixels a side, got {size}")
    return w, h


def draw_page(spec: PageSpec, rng: random.Random, size=96) -> Image.Image:
    """One RGB page of ``spec``; ``size`` is an int (square) or (width, height) in pixels.

    Bands top to bottom (fractions of the height): marks 0.04-0.24, shape band and table band of
    0.32 each in the order ``spec.place`` says, marks after them."""
    w, h = _page_size(size)
    img = Image.new("RGB", (w, h), tuple(rng.randint(235, 255) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    _draw_marks(draw, rng, w, 0.04 * h, 0.24 * h)
    bands = [(0.26 * h, 0.58 * h), (0.6 * h, 0.92 * h)]
    shape_band, table_band = bands if spec.place == "above" else bands[::-1]
    _draw_object(draw, rng, spec, w, shape_band)
    _draw_table(draw, rng, spec.columns, w, table_band)
    _draw_marks(draw, rng, w, 0.94 * h, h - 1)
    return img


def _draw_marks(draw: ImageDraw.ImageDraw, rng: random.Random, w: int, top: float, bottom: float) -> None:
    """Lines of dark bars ("words") with gaps, 2 px tall every 5 px, ragged right edge."""
    y = top
    while y + 2 <= bottom:
        x, end = 0.08 * w, rng.uniform(0.55, 0.92) * w
        while x < end:
            word = rng.uniform(0.04, 0.14) * w
            draw.rectangle([x, y, min(x + word, end), y + 1], fill=INK)
            x += word + rng.uniform(0.02, 0.04) * w
        y += 5


def _draw_object(draw: ImageDraw.ImageDraw, rng: random.Random, spec: PageSpec, w: int, band: tuple) -> None:
    top, bottom = band
    r = rng.uniform(0.36, 0.45) * (bottom - top)
    cx = rng.uniform(0.25, 0.75) * w
    _draw_shape(draw, spec.shape, cx, (top + bottom) / 2, r, COLOURS[spec.colour])


def _draw_table(draw: ImageDraw.ImageDraw, rng: random.Random, columns: int, w: int, band: tuple) -> None:
    """A grid of ``columns`` equal columns and 2-4 rows, 1 px lines, jittered width."""
    top, bottom = band
    left, right = rng.uniform(0.08, 0.2) * w, rng.uniform(0.8, 0.92) * w
    rows = rng.randint(2, 4)
    draw.rectangle([left, top, right, bottom], outline=INK)
    for i in range(1, columns):
        x = left + i * (right - left) / columns
        draw.line([(x, top), (x, bottom)], fill=INK)
    for j in range(1, rows):
        y = top + j * (bottom - top) / rows
        draw.line([(left, y), (right, y)], fill=INK)


def build_corpus(num_pages: int, num_queries: int, seed: int = 0, size=96) -> DocCorpus:
    """``num_pages`` pages of distinct specs and ``num_queries`` queries, each made from a distinct
    page in one of its two phrasings, with graded qrels (module docstring). Deterministic in ``seed``."""
    specs_all = all_specs()
    if not 1 <= num_pages <= len(specs_all):
        raise UserError(f"demo docs num_pages={num_pages} must be in [1, {len(specs_all)}] (distinct pages)")
    if not 1 <= num_queries <= num_pages:
        raise UserError(f"demo docs num_queries={num_queries} must be in [1, num_pages={num_pages}]")
    rng = random.Random(f"docs-{seed}")
    specs = rng.sample(specs_all, num_pages)
    pages = [draw_page(s, rng, size) for s in specs]
    query_pages = sorted(rng.sample(range(num_pages), num_queries))
    queries = [rng.choice(page_queries(specs[i])) for i in query_pages]
    qrels = {q: _qrels_of(specs[i], specs) for q, i in zip(queries, query_pages)}
    return DocCorpus(pages, specs, queries, query_pages, qrels)


def _qrels_of(spec: PageSpec, specs: list) -> dict[int, int]:
    """{page index: grade} for the pages of grade > 0 (grade 0 is every page not listed)."""
    graded = {i: grade(spec, s) for i, s in enumerate(specs)}
    return {i: g for i, g in graded.items() if g > 0}
