"""Trained models outside the trainer: opening, exporting, merging.

``open_model(spec)`` (``reader.py``) is the one answer to "which model is this path?" (a checkpoint,
a run dir, an export folder, a sentence-transformers folder, or a recipe's ``model.backbone.path``):
the model and its ``Provenance``; ``load(path)`` (``embedkit.load``) is its ``Encoder`` form.
``export_model(source, out)`` (``writer.py``) turns a run dir or checkpoint into a self-contained
folder; ``merge_runs`` (``merge.py``) merges run dirs of one base into a new run dir. The folder:

    config.json, model.safetensors, tokenizer/processor files   the backbone (LoRA merged), transformers
    embedkit_adapter.safetensors                               only with merge_lora=false (the LoRA tensors)
    pooling.safetensors                                        a pooling head's weights, if it has any
    embedkit.json                                              what ``load`` needs (model section, ...), the
                                                               provenance and ``"mlflow": {experiment, run_id,
                                                               store}`` (exports before it: ``mlflow_*`` keys)
    modules.json, config_sentence_transformers.json,
    sentence_bert_config.json, 1_Pooling/, 2_Normalize/        sentence-transformers (1_EmbedkitPooling/ for
                                                               heads ST lacks: ``st_module.py``)
    README.md                                                  the model card
"""

from __future__ import annotations

META = "embedkit.json"
FORMAT_VERSION = 1
