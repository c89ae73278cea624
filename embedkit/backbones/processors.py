"""Offline processor pieces shared by the backbones' tiny forms.

There is no model hub here, and tests and the demo need a tokenizer: ``tiny_tokenizer`` builds a
word-level ``PreTrainedTokenizerFast`` in memory from a fixed vocabulary (the demo's words, common
English words, letters and digits) plus the special tokens a family asks for. Real checkpoints load
their own tokenizer from ``model.backbone.path``.
"""

from __future__ import annotations

import string

from embedkit.data.demo import DEMO_WORDS
from embedkit.data.demo_visual import WORDS as VISUAL_DEMO_WORDS

_COMMON = (
    "a an the of in on at to and or is are was with for from by as this that these those it its "
    "what which who where when how why image picture photo photograph text caption query document "
    "represent find retrieve given following answer question describe shows showing there one two "
    "three four five left right top bottom above below next near beside centre center middle "
    "object objects color colour shape small large big man woman person people dog cat car"
).split()


def tiny_vocabulary() -> list[str]:
    words = list(dict.fromkeys(DEMO_WORDS + _COMMON))
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    # the video and docs demos' words last: the image demo's token ids stay as they were
    return list(dict.fromkeys(words + chars + list(VISUAL_DEMO_WORDS)))


def tiny_tokenizer(special_tokens: list[str], *, pad: str, eos: str, unk: str = "<unk>"):
    """A deterministic word-level tokenizer: specials first (ids 0..), then the vocabulary."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys([pad, eos, unk, *special_tokens]))
    vocab = {tok: i for i, tok in enumerate(specials + tiny_vocabulary())}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=pad, eos_token=eos, unk_token=unk,
        additional_special_tokens=[t for t in specials if t not in (pad, eos, unk)],
    )
    fast.padding_side = "right"
    return fast
