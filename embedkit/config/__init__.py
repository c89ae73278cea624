"""Recipes, the override grammar, schema validation and the component registry."""

from embedkit.config.registry import register

__all__ = ["register"]
