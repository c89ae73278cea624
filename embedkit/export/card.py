"""The model card (README.md) of an export folder."""

from __future__ import annotations

import json

from embedkit.runs import RunDir


def title(meta: dict) -> str:
    """The run's name, else the name of the run dir its checkpoint sits in, else the checkpoint's."""
    name = (meta["training_config"].get("run") or {}).get("name")
    if name:
        return name
    run = RunDir.of_checkpoint(meta["checkpoint"])
    return run.path.name if run else meta["checkpoint"]


def inputs_lines(inputs: dict | None) -> list[str]:
    """The card's lines on visual inputs: the frame policy, the image cap and the prompt format."""
    if not inputs:
        return []
    v = inputs["video"]
    rate = f"{v['fps']} frames a second" if v["sampling"] == "fps" else "uniformly"
    cap = inputs.get("max_image_pixels")
    return [f"- videos: at most {v['num_frames']} frames sampled {rate} (at least {v['min_frames']}), "
            f"frames over {v['max_pixels'] or 'no'} pixels resized; images over {cap or 'no'} pixels resized "
            "(`embedkit.load(...).encode(videos=[path])` applies this)",
            f"- prompt format: {inputs['prompt_format']}"]


def render(meta: dict) -> str:
    """The card of an export from its ``embedkit.json`` (``meta``)."""
    config = meta["training_config"]
    model = meta["model"]
    backbone, head = model["backbone"], model["pooling"]["name"]
    run = config.get("run") or {}
    base = config["model"]["backbone"].get("path") or f"tiny random {backbone['name']} (tests/demo)"
    lora = config["model"].get("lora") or {}
    mlflow = meta.get("mlflow") or {}
    lines = [
        "---", "library_name: sentence-transformers", "tags: [embedkit, sentence-transformers, feature-extraction]",
        "---", "", f"# {title(meta)}", "",
        f"An embedding model trained with embedkit: backbone `{backbone['name']}` (base model: `{base}`), "
        f"pooling `{head}`, {'L2-normalised' if meta['normalize'] else 'unnormalised'}, "
        f"{meta['embedding_dim']} dimensions.", "",
        "## Training", "",
        f"- recipe: `{config.get('recipe', 'n/a')}`; run: `{run.get('name', 'n/a')}` (step {meta['step']})",
        f"- loss: `{(config.get('loss') or {}).get('name', 'n/a')}`",
        f"- LoRA: {'r=%s alpha=%s dora=%s, ' % (lora.get('r'), lora.get('alpha'), lora.get('dora')) if lora.get('enabled') else 'none (full fine-tuning)'}"
        f"{('merged into the weights' if meta['merged'] else 'kept beside the base (embedkit_adapter.safetensors)') if lora.get('enabled') else ''}",
        f"- MLflow: experiment `{mlflow.get('experiment', 'n/a')}`, run name `{run.get('name', 'n/a')}`"
        + (f", run id `{mlflow['run_id']}` (store `{mlflow.get('store')}`)" if mlflow.get("run_id") else "")
        + (f"; {mlflow['note']}" if mlflow.get("note") else ""),
    ]
    if (meta.get("lineage") or {}).get("parents"):  # stage 1 -> stage 2 -> merge (tracking/lineage.py)
        from embedkit.tracking.lineage import chain

        lines.append(f"- lineage: {chain(meta['lineage'])}")
    if meta.get("matryoshka_dims"):
        lines.append(f"- Matryoshka dims: {meta['matryoshka_dims']} (embedkit `encode(dim=...)`, "
                     "sentence-transformers `truncate_dim=`)")
    if meta.get("layer") or meta.get("dim"):
        lines.append(f"- cut (2D Matryoshka): the first {meta.get('layer') or meta.get('num_layers')} of "
                     f"{meta.get('num_layers')} layers, {meta.get('dim') or meta['embedding_dim']} of "
                     f"{meta['embedding_dim']} dimensions (`embedkit export layer= dim=`)")
    lines += inputs_lines(meta.get("inputs"))
    if meta.get("metrics"):
        lines += ["", "## Metrics", "", "The latest value of each metric the MLflow run logged.", "",
                  "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in sorted(meta["metrics"].items())]
    if head not in ("last_token", "mean"):
        lines += ["", f"Note: sentence-transformers has no `{head}` pooling; this folder's `1_EmbedkitPooling` "
                  "module is embedkit's (`embedkit.export.st_module`, `pip install embedkit`). sentence-transformers 6 "
                  "imports a module from outside its own package only with `trust_remote_code=True`; the code it runs "
                  "is the installed embedkit, nothing is downloaded."]
    prompt = next(iter(meta["prompts"]), None)
    lines += [
        "", "## Usage", "", "embedkit:", "", "```python", "import embedkit", "",
        'model = embedkit.load("PATH")',
        'emb = model.encode(texts=["a red circle"]' + (f', instruction="{prompt}"' if prompt else "") + ")  # [N, D]",
        "```", ""]
    if meta.get("no_sentence_transformers"):
        lines += [f"No sentence-transformers files: {meta['no_sentence_transformers']}; `embedkit.load` reproduces "
                  "the model's input.", ""]
    elif meta.get("final_norm", True):
        lines += [
            "sentence-transformers (text):", "", "```python",
            "from sentence_transformers import SentenceTransformer", "",
            'model = SentenceTransformer("PATH"' + (", trust_remote_code=True" if head not in ("last_token", "mean")
                                                    else "") + ")",
            'emb = model.encode(["a red circle"]' + (f', prompt_name="{prompt}"' if prompt else "") + ")",
            "```", ""]
    else:
        lines += ["No sentence-transformers files: this model is cut below its top layer and skips the language "
                  "model's final norm, which transformers applies; only `embedkit.load` reproduces it.", ""]
    lines += [
        "transformers (the backbone alone; add the pooling and normalisation yourself):", "",
        "```python", "from transformers import AutoModel", "", 'backbone = AutoModel.from_pretrained("PATH")', "```",
        "", "Serving: the merged weights plus `1_Pooling/config.json` are what vLLM's embedding runner and "
        "text-embeddings-inference read.",
        "", "## Training config", "", "```json", json.dumps(config, indent=2, default=str), "```", "",
    ]
    return "\n".join(lines)

