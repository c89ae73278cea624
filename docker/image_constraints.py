"""Pin the base image's own torch stack for pip, so installing embedkit never replaces it.

    python docker/image_constraints.py > constraints/image.txt     # at build time, in the image
    python docker/image_constraints.py --check constraints/image.txt

Prints ``name==version`` for each of torch, torchvision, torchaudio and triton that the image has
(as pip sees them); ``--check FILE`` exits non-zero if the installed versions differ from FILE,
i.e. if an install step replaced the image's torch.
"""

import sys
from importlib.metadata import PackageNotFoundError, version

STACK = ("torch", "torchvision", "torchaudio", "triton")


def pins() -> list[str]:
    out = []
    for name in STACK:
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pass
    return out


if __name__ == "__main__":
    now = pins()
    if len(sys.argv) == 3 and sys.argv[1] == "--check":
        with open(sys.argv[2]) as f:
            before = [line.strip() for line in f if line.strip() and not line.startswith("#")]
        if before != now:
            sys.exit(f"the image's torch stack changed: {before} -> {now}")
        print("torch stack unchanged:", " ".join(now))
    elif len(sys.argv) == 1:
        if not any(p.startswith("torch==") for p in now):
            sys.exit("no torch in this image: use a PyTorch base image")
        print("# the base image's torch stack, written at build time by docker/image_constraints.py")
        print("\n".join(now))
    else:
        sys.exit(__doc__)
