"""An embedkit model in the ``mteb`` package's own evaluator (the optional ``mteb`` extra, mteb >= 2).

    import mteb
    from embedkit.export.mteb_encoder import MtebEncoder
    model = MtebEncoder("runs/my-run")                 # a run dir, a checkpoint or an export folder
    mteb.evaluate(model, mteb.get_tasks(tasks=["SciFact"]))

``MtebEncoder`` implements mteb's ``EncoderProtocol`` (``mteb.models.models_protocols``, read at mteb
2.26): ``encode(inputs: DataLoader[BatchedInput], *, task_metadata, hf_split, hf_subset, prompt_type)``
returns one row per input. A batch may hold ``text`` (list of str), ``image`` (list of PIL images) or
both (an image with its text); the embedkit encoder (``Encoder.encode``) embeds them as it does
everywhere else, so mteb's numbers are the model's own. The similarity is cosine for a normalising
model, else the dot product (mteb's ``ScoringFunction``), from ``AbsEncoder``.

Instructions: ``prompts`` maps names to instruction text and is looked up as mteb does
(``AbsEncoder.get_prompt_name``: "<task>-<query|document>", "<task>", "<task type>-<side>",
"<task type>", "<query|document>"); the model's own named prompts (an export's ``prompts``) are the
defaults. The found text is prepended to every text of that side, as ``Encoder.encode(instruction=)`` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from embedkit.errors import UserError

try:
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.models.model_meta import ModelMeta, ScoringFunction
except ImportError:  # the optional extra is absent: the class below cannot exist
    raise UserError("embedkit.export.mteb_encoder needs the mteb extra: pip install 'embedkit[mteb]'") from None


class MtebEncoder(AbsEncoder):
    """mteb's encoder protocol over an embedkit ``Encoder`` (or the path ``embedkit.load`` reads)."""

    def __init__(self, model_name, revision: str | None = None, *, device: str | None = None, batch_size: int = 32,
                 prompts: dict[str, str] | None = None, name: str | None = None, **kwargs: Any) -> None:
        from embedkit.export.reader import load

        self.model = model_name if isinstance(model_name, torch.nn.Module) else load(model_name, device=device)
        self.batch_size = batch_size
        self.model_prompts = {**self.model.provenance.prompts, **(prompts or {})}
        label = name or f"embedkit/{Path(str(getattr(self.model.provenance, 'source', None) or 'model')).name}"
        self.mteb_model_meta = ModelMeta.create_empty({
            "name": label, "revision": revision, "embed_dim": self.model.embedding_dim,
            "similarity_fn_name": ScoringFunction.COSINE if self.model.normalize else ScoringFunction.DOT_PRODUCT,
            "modalities": ["text", "image"], "framework": ["PyTorch"], "use_instructions": bool(self.model_prompts),
        })

    def instruction(self, task_metadata, prompt_type) -> str | None:
        """The instruction text for this task and side (mteb's lookup order over ``model_prompts``)."""
        name = self.get_prompt_name(task_metadata, prompt_type)
        return self.model_prompts.get(name) if name else None

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None,
               **kwargs: Any) -> np.ndarray:
        """Every batch of mteb's DataLoader -> float32 [N, D], in input order."""
        instruction = self.instruction(task_metadata, prompt_type)
        parts = [self._encode_batch(batch, instruction) for batch in inputs]
        if not parts:
            return np.zeros((0, self.model.embedding_dim), dtype=np.float32)
        return torch.cat(parts).float().numpy()

    def _encode_batch(self, batch: dict, instruction: str | None) -> torch.Tensor:
        texts, images = batch.get("text"), batch.get("image")
        if texts is None and images is None:
            raise UserError(f"mteb input batch has neither text nor image (keys: {sorted(batch)}); "
                            "the embedkit wrapper encodes text and images")
        if images is not None and texts is not None and not any(texts):
            texts = None  # an image dataset with an empty text column: encode the images alone
        return self.model.encode(texts, images, instruction=instruction, batch_size=self.batch_size)
