"""embedkit: turn vision-language models into embedding models, with PyTorch Lightning.

    import embedkit
    model = embedkit.load("exports/demo")       # an export folder, a run dir or a checkpoint
    emb = model.encode(texts=["a red circle"])  # [N, D], normalised
"""

from embedkit.config.registry import register
from embedkit.version import __version__

__all__ = ["load", "register", "__version__"]


def load(path, device=None):
    """The ``Encoder`` of an export folder, a run dir or a checkpoint (``embedkit.export.reader.load``)."""
    from embedkit.export.reader import load as _load

    return _load(path, device=device)
