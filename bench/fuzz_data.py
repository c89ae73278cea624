"""Hostile training data, fuzzed: seeded shards of mutated samples, trained on by every backbone family.

    PYTHONPATH=. python bench/fuzz_data.py [--samples 1000] [--seed 0] [--families qwen2_vl,hf_text] [--out DIR]

Writes ``--samples`` samples (a seeded mix of good and mutated ones) as shards of 50, then runs a short
``embedkit fit`` of each tiny backbone family on them (in this process, CPU, one DataLoader worker), long
enough that every sample is drawn at least once, and prints the skipped samples per family and reason (the
run's own counts, from its last checkpoint). A crash or a hang fails the family. Acceptance
(issue "safe by default"): 1,000 samples, every family, no crash, every skip counted by reason.

The mutations (``MUTATIONS``; ``fuzz_sample`` makes one sample, ``write_fuzz_shards`` the shards):
byte flips in image bytes, JSON bytes and tar headers (a raw flip breaks the header's checksum and cuts
the shard there; a renamed member, its checksum fixed, is the ``x.jpg`` -> ``x.jpf`` case), cut images and
shards, images of extreme sizes and aspect ratios, of every mode (P with transparency, LA, I;16, CMYK, 1,
RGBA, L) and every EXIF orientation, invalid UTF-8 and lone surrogates, 100k-character and empty texts,
two image placeholders, a missing JSON. ``text_only`` keeps images out (``hf_text`` embeds text only).
``tests/data/test_fuzz_data.py`` runs a small seeded set through every family's processor and forward.

Measured here (seed 0, 1,000 samples, a shared 2-core CPU): every family trained 125 steps of 8 without a
crash or hang; skips (every meeting counts: 1,000 draws read the bad samples of the second pass again):
    qwen2_vl         566: decode 126, processor 120, missing_member 139, bad_json 35, bad_text 138, truncated_shard 8
    llava_onevision  643: decode 130, processor 181, missing_member 145, bad_json 36, bad_text 142, truncated_shard 9
    phi3_v           643: the same as llava_onevision (the same refusals: long texts, two placeholders)
    hf_text          603 (text-only set): missing_member 146, bad_json 59, bad_text 390, truncated_shard 8
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PH = "<|image_1|>"
IMAGE_SIZES = [(1, 1), (2, 2), (3, 3), (1, 400), (400, 1), (1, 4000), (4000, 1), (8000, 2), (2, 8000), (13, 2000),
               (199, 1), (300, 200)]
IMAGE_MODES = ["P", "LA", "I;16", "CMYK", "1", "RGBA", "L"]
#: sample mutations; the first is none. Text-only sets use those not marked as image ones.
MUTATIONS = ["good", "image_size", "image_mode", "exif", "image_flip", "image_cut", "json_flip", "utf8", "surrogate",
             "long_text", "empty_text", "missing_member", "no_json", "placeholders"]
IMAGE_MUTATIONS = {"image_size", "image_mode", "exif", "image_flip", "image_cut", "missing_member", "placeholders"}
#: shard mutations, applied to a written shard: a raw header byte flip, a member renamed (checksum fixed), a cut
SHARD_MUTATIONS = ["header_flip", "rename_member", "cut"]

FAMILIES = {
    "qwen2_vl": ["model.backbone.name=qwen2_vl", "model.backbone.tiny=true", "model.backbone.min_pixels=3136",
                 "model.backbone.max_pixels=3136"],
    "llava_onevision": ["model.backbone.name=llava_onevision", "model.backbone.tiny=true"],
    "phi3_v": ["model.backbone.name=phi3_v", "model.backbone.tiny=true"],
    "hf_text": ["model.backbone.name=hf_text", "model.backbone.tiny=true", "model.backbone.max_length=128"],
}


def _encoded(image, fmt: str = "PNG", **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


def _speckled(w: int, h: int, rng: random.Random):
    from PIL import Image

    img = Image.new("RGB", (w, h), (rng.randrange(256), rng.randrange(256), 90))
    for _ in range(min(64, w * h)):
        img.putpixel((rng.randrange(w), rng.randrange(h)), (rng.randrange(256), 0, 200))
    return img


def _mode_image(mode: str, rng: random.Random) -> tuple[bytes, str]:
    from PIL import Image

    w, h = rng.randrange(4, 40), rng.randrange(4, 40)
    base = _speckled(w, h, rng)
    if mode == "P":
        p = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        return _encoded(p, transparency=0), "png"
    if mode == "CMYK":
        return _encoded(base.convert("CMYK"), "JPEG"), "jpg"
    if mode == "I;16":
        return _encoded(base.convert("L").convert("I;16")), "png"
    return _encoded(base.convert(mode)), "png"


def _exif_image(rng: random.Random) -> tuple[bytes, str]:
    img = _speckled(rng.randrange(4, 30), rng.randrange(4, 30), rng)
    exif = img.getexif()
    exif[0x0112] = rng.randrange(1, 9)  # every EXIF orientation
    return _encoded(img, "JPEG", exif=exif), "jpg"


def _flip(data: bytes, rng: random.Random, flips: int = 3, start: int = 0) -> bytes:
    b = bytearray(data)
    for _ in range(flips):
        i = rng.randrange(start, len(b)) if len(b) > start else 0
        if b:
            b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def _image(mutation: str, rng: random.Random) -> tuple[bytes, str]:
    if mutation == "image_size":
        return _encoded(_speckled(*rng.choice(IMAGE_SIZES), rng)), "png"
    if mutation == "image_mode":
        return _mode_image(rng.choice(IMAGE_MODES), rng)
    if mutation == "exif":
        return _exif_image(rng)
    data = _encoded(_speckled(rng.randrange(8, 40), rng.randrange(8, 40), rng))
    if mutation == "image_flip":
        return _flip(data, rng, flips=rng.randrange(1, 6), start=8), "png"
    if mutation == "image_cut":
        return data[: rng.randrange(8, len(data) // 2)], "png"
    return data, "png"


def _text(mutation: str, key: str, rng: random.Random, side: str) -> str:
    if mutation == "long_text":
        words = " ".join(rng.sample(["red", "square", "left", "circle", "zq" + key], 5)) + " "
        return (words * (100_000 // len(words) + 1))[:100_000]
    if mutation == "empty_text" and side == "positive":
        return ""
    return f"{key} {side} {rng.choice(['red', 'blue', 'green'])} {rng.choice(['circle', 'square'])}"


def fuzz_sample(rng: random.Random, key: str, mutation: str, text_only: bool = False) -> dict[str, bytes]:
    """One sample's files (``shards.encode_example``'s layout) under ``mutation`` (one of ``MUTATIONS``)."""
    image = None if text_only else _image(mutation, rng)
    q_text = _text(mutation, key, rng, "query")
    if mutation == "placeholders" and image is not None:
        q_text = f"{PH} {q_text} {PH}"
    elif image is not None:
        q_text = f"{PH} {q_text}"
    meta = {"task": "fuzz", "query": {"text": q_text, "image": image[1] if image else None},
            "positive": {"text": _text(mutation, key, rng, "positive"), "image": None},
            "negatives": [{"text": _text("good", key, rng, "negative"), "image": None}]}
    if mutation == "empty_text" and text_only:
        meta["query"]["text"] = ""
    files = {}
    if image is not None:
        ext = image[1] + ("f" if mutation == "missing_member" else "")  # declared .png, stored as .pngf
        files[f"{key}.q.{ext}"] = image[0]
    raw = json.dumps(meta).encode()
    if mutation == "utf8":
        raw = raw.replace(b" query ", b" qu\xff\xfery ", 1)
    elif mutation == "surrogate":
        raw = raw.replace(b" query ", b" qu\\udc80ery ", 1)
    elif mutation == "json_flip":
        raw = _flip(raw, rng, flips=rng.randrange(1, 4))
    if mutation != "no_json":
        files[f"{key}.json"] = raw
    elif not files:  # text-only: a stray member, so the sample exists without its JSON
        files[f"{key}.txt"] = b"no json here"
    return files


def _header_offsets(data: bytes) -> list[int]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return [m.offset for m in tar.getmembers()]


def _rename_member(data: bytes, offset: int) -> bytes:
    """The member at ``offset`` renamed (the last letter of its name flipped), its header checksum fixed:
    a tar that reads cleanly but whose sample lacks the member its JSON declares."""
    b = bytearray(data)
    name = bytes(b[offset: offset + 100]).rstrip(b"\0")
    b[offset + len(name) - 1] ^= 0x02
    b[offset + 148: offset + 156] = b" " * 8
    b[offset + 148: offset + 156] = b"%06o\0 " % sum(b[offset: offset + 512])
    return bytes(b)


def mutate_shard(data: bytes, mutation: str, rng: random.Random) -> bytes:
    offsets = _header_offsets(data)
    if mutation == "header_flip":  # one bit of a member's header: its checksum no longer holds
        b, at = bytearray(data), rng.choice(offsets[1:] or offsets) + rng.randrange(512)
        b[at] ^= 1 << rng.randrange(8)
        return bytes(b)
    if mutation == "rename_member":
        return _rename_member(data, rng.choice(offsets))
    return data[: rng.randrange(512, len(data))]  # cut


def write_fuzz_shards(out: Path, seed: int, samples: int, per_shard: int = 50, text_only: bool = False) -> dict:
    """Write ``samples`` fuzzed samples (40 % good, the rest a seeded draw of ``MUTATIONS``) as shards of
    ``per_shard`` under ``out``; shards 1, 4, 7, ... get ``SHARD_MUTATIONS`` in turn (the first stays whole,
    so the source always has a readable sample). Returns {"samples": {key: mutation}, "shard_of": {key:
    path}, "shards": {path: its shard mutation or "good"}}."""
    from embedkit.data.shards import write_shard

    rng = random.Random(seed)
    kinds = [m for m in MUTATIONS if not (text_only and m in IMAGE_MUTATIONS)]
    truth: dict = {"samples": {}, "shard_of": {}, "shards": {}}
    out.mkdir(parents=True, exist_ok=True)
    for j, s in enumerate(range(0, samples, per_shard)):
        path, batch = out / f"train-{j:06d}.tar", []
        for i in range(s, min(samples, s + per_shard)):
            key = f"f{seed:03d}x{i:05d}"
            mutation = "good" if rng.random() < 0.4 else rng.choice(kinds[1:])
            truth["samples"][key], truth["shard_of"][key] = mutation, str(path)
            batch.append(fuzz_sample(rng, key, mutation, text_only))
        write_shard(path, batch)
        shard_mutation = SHARD_MUTATIONS[(j // 3) % len(SHARD_MUTATIONS)] if j % 3 == 1 else "good"
        if shard_mutation != "good":
            path.write_bytes(mutate_shard(path.read_bytes(), shard_mutation, rng))
        truth["shards"][str(path)] = shard_mutation
    return truth


def fit_family(family: str, shards: Path, samples: int, work: Path) -> dict:
    """A short in-process ``embedkit fit`` of ``family`` on ``shards``: every sample drawn at least once.
    Returns the run's skipped samples by reason (its last checkpoint's counts) and the wall time."""
    import torch

    from embedkit.cli import main as cli_main

    batch = 8
    run = work / f"run-{family}"
    args = ["fit", "recipe=demo", *FAMILIES[family], f"data.train.shards={shards}", "data.demo.enabled=false",
            f"trainer.max_steps={-(-samples // batch)}", f"run.dir={run}", f"train.global_batch_size={batch}",
            "train.chunk_size=8", "data.train.num_workers=1", "data.train.shuffle_buffer=16",
            "data.train.task_batch_size=0", "trainer.log_every_n_steps=50", "tracking.enabled=false",
            "trainer.progress=none"]
    start = time.perf_counter()
    code = cli_main(args)
    wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"{family}: fit exited {code}")
    from embedkit.runs import RunDir

    ckpt = torch.load(RunDir(run).last_checkpoint, map_location="cpu", weights_only=False)
    return {"skipped": ckpt["embedkit"]["data_skipped"], "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.out or tmp)
        for family in a.families.split(","):
            text_only = family == "hf_text"
            shards = work / ("shards-text" if text_only else "shards")
            if not shards.exists():
                truth = write_fuzz_shards(shards, a.seed, a.samples, text_only=text_only)
                mut = {m: list(truth["samples"].values()).count(m) for m in MUTATIONS}
                shard_mut = {m: list(truth["shards"].values()).count(m) for m in ["good", *SHARD_MUTATIONS]}
                print(f"{shards}: {a.samples} samples {json.dumps({k: v for k, v in mut.items() if v})}; "
                      f"shards {json.dumps(shard_mut)}")
            result = fit_family(family, shards, a.samples, work)
            counts = {k: v for k, v in result["skipped"].items() if v}
            print(f"{family}: trained, {sum(counts.values())} skipped {json.dumps(counts)} "
                  f"({result['wall_s']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
