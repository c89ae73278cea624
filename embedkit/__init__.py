"""embedkit: turn vision-language models into embedding models, with PyTorch Lightning.

    import embedkit
    model = embedkit.load("exports/demo")       # an export folder, a run dir or a checkpoint
    emb = model.encode(texts=["a red circle"])  # [N, D], normalised
    small = embedkit.load("exports/demo", layer=1, dim=16)  # the first layer only, 16 dims
"""

from embedkit.config.registry import register
from embedkit.version import __version__

__all__ = ["load", "register", "__version__"]


def load(path, device=None, layer=None, dim=None, trust_checkpoint=False):
    """The ``Encoder`` of an export folder, a run dir or a checkpoint (``embedkit.export.reader.load``);
    ``layer``/``dim``: cut to that depth and embedding size (2D Matryoshka / Starbucks). A checkpoint
    is read weights-only (no code in it runs); ``trust_checkpoint=True`` reads a file you trust fully."""
    from embedkit.export.reader import load as _load

    return _load(path, device=device, layer=layer, dim=dim, trust_checkpoint=trust_checkpoint)
