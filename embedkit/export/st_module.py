"""``EmbedkitPooling``: a sentence-transformers module for the heads sentence-transformers lacks.

An export whose head is not one of ST's own poolings (``latent_attention``, ``multi_layer``, a
plugin's head) lists this module in ``modules.json``:

    0 Transformer (token_embeddings, attention_mask[, all_layer_embeddings]) -> 1 EmbedkitPooling
      (sentence_embedding) -> 2 Normalize

It rebuilds the embedkit head from ``1_EmbedkitPooling/config.json`` (the ``model.pooling`` section
plus the backbone's ``hidden_size`` and ``num_layers``) through the registry, loads its weights from
its own ``model.safetensors`` (written when ST saves the model again) or else the export's
``pooling.safetensors``, and pools exactly as ``Encoder.forward`` does: every token the tokenizer
made, the prompt included (embedkit prepends an instruction to the text). Heads that need every
layer read ``all_layer_embeddings``, which ST's Transformer fills when the model config has
``output_hidden_states`` (the export's ``sentence_bert_config.json`` sets it in ``config_kwargs``).

sentence-transformers 6 imports a ``modules.json`` type outside its own package only with
``SentenceTransformer(path, trust_remote_code=True)``; the code it runs is this installed module.
"""

from __future__ import annotations

import os
from typing import Any

from sentence_transformers.base.modules.module import Module

from embedkit.config import registry

#: the export's head weights, beside the backbone (``embedkit.export.reader.POOLING``)
EXPORT_WEIGHTS = "pooling.safetensors"
OWN_WEIGHTS = "model.safetensors"


class EmbedkitPooling(Module):
    """``features`` (token_embeddings [B,T,H], attention_mask [B,T], all_layer_embeddings) ->
    ``features`` with ``sentence_embedding`` [B,H] (float32, before ST's Normalize)."""

    config_keys = ["pooling", "embedding_dimension", "hidden_size", "num_layers", "plugins"]

    def __init__(self, pooling: dict, embedding_dimension: int, hidden_size: int | None = None,
                 num_layers: int | None = None, plugins: list[str] | None = None):
        super().__init__()
        self.pooling = dict(pooling)
        self.embedding_dimension = int(embedding_dimension)
        self.hidden_size = int(hidden_size or embedding_dimension)
        self.num_layers = num_layers
        self.plugins = list(plugins or [])
        registry.load_plugins(self.plugins)
        self.head = registry.build("pooling", self.pooling, hidden_size=self.hidden_size, num_layers=num_layers)

    def forward(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
        hidden, mask = features["token_embeddings"], features["attention_mask"]
        layers = None
        if self.head.needs_all_layers:
            layers = features.get("all_layer_embeddings")
            if layers is None:
                raise ValueError(f"EmbedkitPooling: the {self.pooling.get('name')!r} head needs every layer's hidden "
                                 "states; set config_kwargs.output_hidden_states=true in sentence_bert_config.json")
            layers = tuple(layers)
        features["sentence_embedding"] = self.head(hidden, mask, layers).float()
        return features

    def get_embedding_dimension(self) -> int:
        return self.embedding_dimension

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        from safetensors.torch import save_file

        self.save_config(output_path)
        state = {k: v.detach().contiguous() for k, v in self.head.state_dict().items()}
        if state:
            save_file(state, os.path.join(output_path, OWN_WEIGHTS))

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token: bool | str | None = None,
             cache_folder: str | None = None, revision: str | None = None, local_files_only: bool = False,
             **kwargs) -> "EmbedkitPooling":
        from safetensors.torch import load_file

        hub = {"token": token, "cache_folder": cache_folder, "revision": revision, "local_files_only": local_files_only}
        config = cls.load_config(model_name_or_path, subfolder=subfolder, **hub)
        module = cls(**config)
        expected = set(module.head.state_dict())
        if not expected:
            return module
        path = (cls.load_file_path(model_name_or_path, OWN_WEIGHTS, subfolder=subfolder, **hub)
                or cls.load_file_path(model_name_or_path, EXPORT_WEIGHTS, **hub))
        if path is None:
            raise ValueError(f"EmbedkitPooling: no weights for the {module.pooling.get('name')!r} head in "
                             f"{model_name_or_path} ({subfolder}/{OWN_WEIGHTS} or {EXPORT_WEIGHTS})")
        state = load_file(path)
        if set(state) != expected:
            raise ValueError(f"EmbedkitPooling: {path} does not hold the head's weights "
                             f"(missing {sorted(expected - set(state))[:3]}, unexpected {sorted(set(state) - expected)[:3]})")
        module.head.load_state_dict(state)
        return module.eval()

    def __repr__(self) -> str:
        return f"EmbedkitPooling({self.pooling}, embedding_dimension={self.embedding_dimension})"
