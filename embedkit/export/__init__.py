"""Export and loading of trained models outside the trainer.

``export_model(source, out)`` (``writer.py``) turns a run dir or checkpoint into a self-contained
folder; ``load(path)`` (``reader.py``) rebuilds the ``Encoder`` from an export folder, a run dir or a
checkpoint. The folder:

    config.json, model.safetensors, tokenizer/processor files   the backbone (LoRA merged), transformers
    embedkit_adapter.safetensors                               only with merge_lora=false (the LoRA tensors)
    pooling.safetensors                                        a pooling head's weights, if it has any
    embedkit.json                                              what ``load`` needs (model section, ...)
    modules.json, config_sentence_transformers.json,
    sentence_bert_config.json, 1_Pooling/, 2_Normalize/        sentence-transformers (1_EmbedkitPooling/ for
                                                               heads ST lacks: ``st_module.py``)
    README.md                                                  the model card
"""

from __future__ import annotations

META = "embedkit.json"
FORMAT_VERSION = 1
