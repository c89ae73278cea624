"""Synthetic multi-vector data for measuring MUVERA (``bench/muvera.py``, ``tests/eval/test_muvera.py``):
a clustered corpus of token-vector sets and the recall of FDE candidates against exact MaxSim. Bench
and test instruments, not part of the shipped package.
"""

from __future__ import annotations

import torch

from embedkit.eval.muvera import MuveraIndex, maxsim


def clustered_corpus(num_docs: int = 3000, num_queries: int = 50, dim: int = 32, clusters: int = 200,
                     doc_tokens: tuple[int, int] = (8, 24), query_tokens: int = 8, topics: int = 4,
                     noise: float = 0.1, seed: int = 0):
    """A synthetic multi-vector corpus (``bench/muvera.py``, ``tests/eval/test_muvera.py``): each document draws ``topics``
    cluster centres and its tokens are noisy copies of them (unit norm, lengths in ``doc_tokens``, padded,
    with a mask); each query takes ``query_tokens`` noisy copies of a random document's centres, so
    near and far documents exist for every query. Returns ``(docs, doc_mask, queries, query_mask)``."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(clusters, dim, generator=g), dim=-1)
    doc_topics = torch.randint(0, clusters, (num_docs, topics), generator=g)

    def tokens(topic_ids: torch.Tensor, n: int) -> torch.Tensor:
        pick = topic_ids[torch.randint(0, len(topic_ids), (n,), generator=g)]
        return torch.nn.functional.normalize(centres[pick] + noise * torch.randn(n, dim, generator=g), dim=-1)

    lengths = torch.randint(doc_tokens[0], doc_tokens[1] + 1, (num_docs,), generator=g)
    docs = torch.zeros(num_docs, doc_tokens[1], dim)
    doc_mask = torch.arange(doc_tokens[1])[None] < lengths[:, None]
    for i in range(num_docs):
        docs[i, : lengths[i]] = tokens(doc_topics[i], int(lengths[i]))
    sources = torch.randint(0, num_docs, (num_queries,), generator=g)
    queries = torch.stack([tokens(doc_topics[s], query_tokens) for s in sources.tolist()])
    return docs, doc_mask, queries, torch.ones(num_queries, query_tokens, dtype=torch.bool)


def recall_of_exact_top(index: MuveraIndex, q: torch.Tensor, q_mask: torch.Tensor | None, k: int = 10,
                        candidates: int = 100) -> float:
    """The fraction of the exact MaxSim top ``k`` found among the FDE's ``candidates`` best documents."""
    exact = maxsim(q, q_mask, index.docs, index.doc_mask).topk(k, dim=1).indices
    found = index.candidates(q, q_mask, candidates)
    hits = sum(len(set(e.tolist()) & set(f.tolist())) for e, f in zip(exact, found))
    return hits / exact.numel()
