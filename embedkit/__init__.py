"""embedkit: turn vision-language models into embedding models, with PyTorch Lightning."""

from embedkit.config.registry import register

__version__ = "0.1.0"
__all__ = ["register", "__version__"]
