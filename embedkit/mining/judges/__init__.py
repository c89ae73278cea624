"""Judges: score (query, candidate) pairs for mining's false-negative filter (``embedkit mine judge=NAME``).

A judge is a registered component of kind ``judge`` (``@register("judge", "my_reranker")``), built from
the ``judge`` block of ``embedkit mine`` like a loss is from ``loss``. The built-in ``embedding`` judge
is the mining model itself (cosine of its embeddings); a reranker or a VLM yes/no judge (UniME-V2's
P(yes)) plugs in by name through ``plugins=[mymodule]``. See ``mining/judges/base.py`` for the contract.
"""
