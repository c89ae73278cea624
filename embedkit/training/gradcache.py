"""GradCache (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup", arXiv 2101.06983): a contrastive batch far larger than one forward pass, with exact gradients.

    pass 1  encode every chunk under no_grad, recording the RNG state per chunk
    cache   loss on all the (detached) embeddings; autograd gives d loss / d embedding
    pass 2  re-encode each chunk with grad under its recorded RNG state (dropout replays exactly)
            and backpropagate the surrogate sum(embedding * cached_grad)

The last chunk of pass 1 is encoded with grad and its graph kept for pass 2, which backpropagates
it first: one chunk fewer to re-encode, at no cost in peak memory (pass 2 holds one chunk's
activations anyway). With 2 chunks that halves the extra forward.

Without the cache (``use_cache=False``; by default when there is only one chunk) every chunk is
encoded once with grad and the loss backpropagated directly: the module turns the cache off when
each side (queries, candidates) fits in one chunk, saving the extra forward pass. The same
function runs both ways, so there is no silent fallback.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch

from embedkit.losses.base import LossOutput


class RngState:
    """The CPU and (if present) CUDA generator states, to replay a forward pass's randomness."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    @contextlib.contextmanager
    def replay(self):
        devices = list(range(torch.cuda.device_count())) if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state_all(self.cuda)
            yield


def cached_step(
    encode: Callable[[Any], torch.Tensor],
    chunks: Sequence[Any],
    loss_fn: Callable[[list[torch.Tensor]], LossOutput],
    backward: Callable[[torch.Tensor], None],
    scale: float = 1.0,
    before_last_backward: Callable[[], None] | None = None,
    use_cache: bool | None = None,
) -> LossOutput:
    """Encode ``chunks``, compute ``loss_fn(embeddings per chunk)``, backpropagate ``scale * loss``.

    ``backward(tensor)`` runs a backward pass (``LightningModule.manual_backward``); gradients
    accumulate in the parameters. ``before_last_backward()`` runs just before the step's last
    backward pass (FSDP2 turns its gradient reduce-scatter back on there). ``use_cache``: None
    caches when there is more than one chunk. Returns the LossOutput (its loss detached).
    """
    last = before_last_backward or (lambda: None)
    if use_cache is None:
        use_cache = len(chunks) > 1
    if not use_cache:
        out = loss_fn([encode(chunk) for chunk in chunks])
        last()
        backward(out.loss * scale)
        return LossOutput(out.loss.detach(), out.parts)

    *replayed, kept_chunk = chunks
    states, cached = [], []
    with torch.no_grad():
        for chunk in replayed:
            states.append(RngState())
            cached.append(encode(chunk).detach().requires_grad_())
    kept = encode(kept_chunk)  # with grad: no replay needed for this one
    cached.append(kept.detach().requires_grad_())
    out = loss_fn(cached)
    backward(out.loss * scale)  # fills cached[i].grad, and the loss's own parameters' grads

    def surrogate_backward(fresh: torch.Tensor, emb: torch.Tensor, is_last: bool) -> None:
        if is_last:
            last()
        # a chunk the loss does not read (an FSDP2 padding pass) has no gradient: backpropagate zeros,
        # so the pass still runs its backward (and its collectives) like every other chunk
        grad = emb.grad if emb.grad is not None else torch.zeros_like(emb)
        backward(torch.sum(fresh * grad.to(fresh.dtype)))

    surrogate_backward(kept, cached[-1], not replayed)
    del kept  # frees its activations before the replays
    for i, (chunk, state, emb) in enumerate(zip(replayed, states, cached)):
        with state.replay():
            fresh = encode(chunk)
        surrogate_backward(fresh, emb, i == len(replayed) - 1)
    return LossOutput(out.loss.detach(), out.parts)
