"""GradCache: a global contrastive batch whose encoder memory does not grow with its size.

1. encode the local batch in micro-chunks without grad, remembering each chunk's RNG state;
2. compute the (tiled, distributed) loss on the detached features and get d loss / d features;
3. re-encode each chunk with grad under the same RNG state (same dropout) and backpropagate
   the surrogate <features, d loss / d features>, plus the scale/bias terms once.
The parameter gradients equal those of one full-batch backward; only one chunk's activations
live at a time. `backward` is `engine.backward` under DeepSpeed (with unmanaged gradient
accumulation, so the per-chunk backwards add up and `engine.step()` is the one boundary).
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Callable, Sequence, cast

import torch

from pipeline.batch import SCALARS, Batch, Features


class RngState:
    """CPU and CUDA RNG state at one point, to replay dropout exactly."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def split_batch(batch: Batch, size: int) -> list[Batch]:
    """Split every tensor (and nested mask tensors) of a batch dict along dim 0 into chunks of `size`."""
    n = next(v.shape[0] for v in batch.values() if torch.is_tensor(v))
    chunks: list[Batch] = []
    for start in range(0, n, size):
        sl = slice(start, start + size)
        chunk: Batch = {}
        for k, v in batch.items():
            chunk[k] = _slice(v, sl)
        chunks.append(chunk)
    return chunks


def _slice(value, sl: slice):
    if torch.is_tensor(value):
        return value[sl]
    if isinstance(value, dict):
        return {k: _slice(v, sl) for k, v in value.items()}
    if isinstance(value, list):
        return value[sl]
    return value


def _set_grads(params: Sequence[torch.nn.Parameter], grads) -> None:
    for p, g in zip(params, grads):
        p.grad = g


def grad_cache_step(
    encode: Callable[[Batch], Features],
    loss_fn: Callable[[Features], torch.Tensor],
    backward: Callable[[torch.Tensor], object],
    batch: Batch,
    micro_batch: int,
    grad_scale: float = 1.0,
    check_loss: Callable[[torch.Tensor], bool] = lambda loss: True,
    extra_params: Sequence[torch.nn.Parameter] = (),
    timed: Callable[[str], AbstractContextManager] = lambda phase: nullcontext(),
) -> torch.Tensor:
    """One GradCache forward/backward; returns the detached loss.

    `encode(chunk)` returns features (and logit_scale/bias) with grad; `loss_fn(features)` the loss on
    the cached features. `grad_scale` multiplies the surrogate (DeepSpeed averages gradients over
    ranks, the distributed loss gives each rank its share of the sum). If `check_loss(loss)` is False
    (e.g. NaN on some rank) nothing is backpropagated. `extra_params` are the loss's own parameters
    (outside the model and the engine): their `.grad` is set directly, unscaled. `timed(phase)` spans the
    forward, loss and backward work (pipeline.train.phases).
    """
    chunks = split_batch(batch, micro_batch)
    if len(chunks) == 1:  # nothing to cache: one forward with grad is the same computation
        with timed("forward"):
            features = encode(batch)
        with timed("loss"):
            loss = loss_fn(features)
            finite = check_loss(loss)
            if finite and extra_params:
                _set_grads(extra_params, torch.autograd.grad(loss, list(extra_params), retain_graph=True))
        if finite:
            with timed("backward"):
                backward(loss * grad_scale)
        return loss.detach()
    states, cached = [], []
    with torch.no_grad(), timed("forward"):
        for chunk in chunks:
            states.append(RngState())
            cached.append(encode(chunk))
    end_state = RngState()
    joined = {k: torch.cat([c[k] for c in cached]) if k not in SCALARS else cached[0][k]
              for k in cached[0]}
    leaves: dict[str, torch.Tensor] = {k: v.detach().requires_grad_(True) for k, v in joined.items()}
    with timed("loss"):
        loss = loss_fn(cast(Features, leaves))  # the cached features as leaves (Features is a plain dict at run time)
        if not check_loss(loss):
            return loss.detach()
        *feature_grads, = torch.autograd.grad(loss, [*leaves.values(), *extra_params], allow_unused=True)
    grads = dict(zip(leaves, feature_grads[:len(leaves)]))
    _set_grads(extra_params, feature_grads[len(leaves):])

    offset = 0
    for i, (chunk, state) in enumerate(zip(chunks, states)):
        state.restore()
        with timed("forward"):
            out = encode(chunk)
        n = next(out[k].shape[0] for k in out if k not in SCALARS)
        surrogate = sum((out[k] * grads[k][offset:offset + n]).sum()
                        for k in out if k not in SCALARS and grads.get(k) is not None)
        if i == 0:  # the scale and bias enter the loss once, not once per chunk
            surrogate = surrogate + sum((out[k] * grads[k]).sum() for k in SCALARS
                                        if k in out and grads.get(k) is not None)
        # a tensor: sum() of tensor terms (typeshed's sum() types it as int, its start value 0)
        with timed("backward"):
            backward(cast(torch.Tensor, surrogate) * grad_scale)
        offset += n
    end_state.restore()
    return loss.detach()
