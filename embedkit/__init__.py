"""embedkit: turn vision-language models into embedding models, with PyTorch Lightning."""

from embedkit.config.registry import register
from embedkit.version import __version__

__all__ = ["register", "__version__"]
