"""``encode_file`` over a corpus with images (paths and encoded bytes) and an instruction: through the
inference engine as ``RowItems``, the embeddings ``Encoder.encode`` gives for the same rows, with and
without loader workers; a missing image is a one-line error."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from embedkit.config.loader import compose
from embedkit.encoder import Encoder
from embedkit.errors import UserError
from embedkit.export.corpus import RowItems, encode_file
from embedkit.inference import item_costs
from tests.helpers.images import speckled_image


@pytest.fixture(scope="module")
def encoder():
    cfg = compose(["recipe=demo", "model.backbone.name=qwen2_vl", "model.backbone.tiny=true"])
    return Encoder.from_config(cfg["model"], seed=0).eval()


def corpus(tmp_path):
    images = [speckled_image(w, h, i) for i, (w, h) in enumerate([(56, 56), (112, 56), (56, 140), (84, 84)])]
    for i, im in enumerate(images[:2]):
        im.save(tmp_path / f"im{i}.png")
    blobs = []
    for im in images[2:]:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        blobs.append(buf.getvalue())
    def path(name):
        return {"bytes": None, "path": name}

    def data(blob):
        return {"bytes": blob, "path": None}

    rows = [{"text": "a red circle at the top left", "image": None}, {"text": None, "image": path("im0.png")},
            {"text": "left", "image": path("im1.png")}, {"text": None, "image": data(blobs[0])},
            {"text": "the square", "image": None}, {"text": "blue", "image": data(blobs[1])},
            {"text": "a small green triangle in the centre of the picture", "image": None}]
    return rows, [None, images[0], images[1], images[2], None, images[3], None]


def test_encode_file_embeds_rows_with_images_as_encode_does(encoder, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, images = corpus(tmp_path)
    path = tmp_path / "corpus.parquet"
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([("text", pa.string()), ("image", image)])), path)
    ref = encoder.encode(texts=[r.get("text") for r in rows], images=images, instruction="query: ", batch_size=1,
                         sort=False)
    for workers in (0, 1):
        out = encode_file(encoder, path, tmp_path / f"emb{workers}.npy", batch_size=2, part_size=4,
                          instruction="query: ", num_workers=workers, log=lambda m: None)
        assert np.abs(np.load(out) - ref.numpy()).max() <= 1e-6


def test_row_items_are_costed_without_decoding_and_a_missing_image_is_one_line(encoder, tmp_path):
    rows, images = corpus(tmp_path)
    items = RowItems(rows, tmp_path, "query: ")
    costs = item_costs(items, encoder.processor())
    assert costs == encoder.processor().costs([items[i] for i in range(len(rows))])
    assert items.sized(1).image.size == (56, 56) and items.sized(5).image.size == (84, 84)
    path = tmp_path / "missing.jsonl"
    path.write_text(json.dumps({"text": "x", "image": "nowhere.png"}) + "\n")
    with pytest.raises(UserError, match=r"^input: row 1: image not found: .*nowhere\.png$"):  # names its row
        encode_file(encoder, path, tmp_path / "m.npy", num_workers=1, log=lambda m: None)
