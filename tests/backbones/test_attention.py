"""Bidirectional attention for decoder backbones (NV-Embed arXiv 2405.17428, arXiv 2409.02727:
an embedding reads the whole input, not only what precedes each token).

``model.backbone.attention=bidirectional`` removes the causal mask of the language model: an early
token's state then depends on later tokens (it does not under ``causal``), padding still never leaks
into real tokens (left or right padded, mean pooling), and an export reproduces it.
"""

from __future__ import annotations

import json

import pytest
import torch

import embedkit
from embedkit.backbones.hf_text import HFText
from embedkit.backbones.llava_onevision import LlavaOnevision
from embedkit.backbones.phi3_v import Phi3V
from embedkit.backbones.qwen2_vl import Qwen2VLBackbone
from embedkit.data.schema import Item
from embedkit.errors import UserError
from embedkit.export.writer import export_model
from tests.export.test_export import assert_equal_embeddings, items_for, reference, trained_run

FAMILIES = {"qwen2_vl": Qwen2VLBackbone, "llava_onevision": LlavaOnevision, "phi3_v": Phi3V, "hf_text": HFText}


def hidden(backbone, items):
    backbone.eval()
    with torch.no_grad():
        out = backbone(backbone.make_processor()(items))
    return out.hidden, out.mask


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_later_token_changes_an_early_state_only_when_bidirectional(family):
    a, b = Item(text="a red circle at the top left"), Item(text="a red circle at the top right")
    for attention, changes in (("causal", False), ("bidirectional", True)):
        backbone = FAMILIES[family](seed=0, tiny=True, attention=attention)
        # one item per pass: no padding, so transformers may skip the mask (the module flag path) ...
        ha, hb = hidden(backbone, [a])[0][0], hidden(backbone, [b])[0][0]
        # ... and padded batches (the materialised mask path)
        pa = hidden(backbone, [a, Item(text="a")])[0][0]
        pb = hidden(backbone, [b, Item(text="a")])[0][0]
        n = ha.shape[0]
        assert hb.shape[0] == n and not torch.allclose(ha[n - 2:], hb[n - 2:])  # the sequences differ late
        for x, y in ((ha, hb), (pa, pb)):
            differ = (x[0] - y[0]).abs().max().item() > 1e-4
            assert differ == changes, (family, attention)


def test_bidirectional_is_the_same_weights():
    """The switch changes the mask only: same seed, same parameters."""
    causal, bidi = HFText(seed=0, tiny=True), HFText(seed=0, tiny=True, attention="bidirectional")
    for (n, p), (_, q) in zip(causal.state_dict().items(), bidi.state_dict().items()):
        assert torch.equal(p, q), n


def test_bidirectional_mean_pooling_ignores_padding_on_either_side():
    backbone = HFText(seed=0, tiny=True, attention="bidirectional").eval()
    items = [Item(text="a red circle at the top left"), Item(text="blue"), Item(text="a green cross below it")]
    inputs = backbone.make_processor()(items)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    pad = backbone.tokenizer.pad_token_id

    def mean_pool(ids, mask, position_ids):
        with torch.no_grad():
            h = backbone.model(input_ids=ids, attention_mask=mask, position_ids=position_ids).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1)

    positions = (mask.cumsum(1) - 1).clamp(min=0)
    right = mean_pool(ids, mask, positions)
    left_ids, left_mask = torch.full_like(ids, pad), torch.zeros_like(mask)
    for i, n in enumerate(mask.sum(1).tolist()):
        left_ids[i, -n:], left_mask[i, -n:] = ids[i, :n], 1
    left = mean_pool(left_ids, left_mask, (left_mask.cumsum(1) - 1).clamp(min=0))
    torch.testing.assert_close(left, right, atol=1e-5, rtol=1e-5)
    for i, item in enumerate(items):  # and alone, unpadded
        one = backbone.make_processor()([item])
        alone = mean_pool(one["input_ids"], one["attention_mask"], None)
        torch.testing.assert_close(right[i], alone[0], atol=1e-5, rtol=1e-5)


def test_bidirectional_is_refused_for_an_encoder(tmp_path):
    from transformers import BertConfig, BertModel

    from embedkit.backbones.processors import tiny_tokenizer

    tok = tiny_tokenizer(["[CLS]", "[SEP]"], pad="[PAD]", eos="[SEP]")
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64), add_pooling_layer=False).save_pretrained(str(tmp_path))
    tok.save_pretrained(str(tmp_path))
    HFText(seed=0, path=str(tmp_path))  # causal (the default) is accepted: the key is a no-op there
    with pytest.raises(UserError, match=r"^model\.backbone\.attention: bidirectional is for decoder models"):
        HFText(seed=0, path=str(tmp_path), attention="bidirectional")


def test_unknown_attention_word_is_a_config_error():
    from embedkit.config.loader import compose

    with pytest.raises(UserError, match="attention"):
        compose(["recipe=demo", "model.backbone.attention=sideways"])


@pytest.mark.parametrize("family", ["hf_text", "qwen2_vl"])
def test_export_and_load_reproduce_bidirectional_attention(family, tmp_path):
    run, module = trained_run(tmp_path, [f"model.backbone.name={family}", "model.backbone.tiny=true",
                                         "model.backbone.attention=bidirectional", "model.pooling=mean"])
    items = items_for(family)
    ref = reference(module, items)
    assert not torch.allclose(ref, reference(causal_twin(module, family), items), atol=1e-3)  # the switch matters here
    for source in (export_model(run, tmp_path / "export", log=lambda m: None), run):
        assert_equal_embeddings(embedkit.load(source), items, ref)  # batch sizes, both padding sides
    meta = json.loads((tmp_path / "export" / "embedkit.json").read_text())
    assert meta["model"]["backbone"]["attention"] == "bidirectional"
    config = json.loads((tmp_path / "export" / "config.json").read_text())  # what transformers readers see
    assert (config.get("text_config") or config)["is_causal"] is False


def causal_twin(module, family):
    """The same weights under causal attention."""
    from embedkit.config.loader import compose
    from embedkit.training.module import EmbeddingModule

    cfg = compose(["recipe=demo", f"model.backbone.name={family}", "model.backbone.tiny=true", "model.pooling=mean"])
    twin = EmbeddingModule.from_config(cfg)
    twin.load_state_dict(module.state_dict())
    return twin.eval()
