"""Collectives the tiled losses use: all communication is O(B·D) features or O(B) statistics."""
from __future__ import annotations

import torch
import torch.distributed as dist


def rank_and_world(group) -> tuple[int, int]:
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate every rank's rows (no autograd)."""
    if group is None:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts)


def sum_ranks(x: torch.Tensor, group) -> torch.Tensor:
    if group is None:
        return x
    x = x.clone()
    dist.all_reduce(x, group=group)
    return x


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient for this rank's rows."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        ctx.rows = x.shape[0]
        return gather_rows(x, group)

    @staticmethod
    def backward(ctx, grad):
        rank, _ = rank_and_world(ctx.group)
        total = sum_ranks(grad.contiguous(), ctx.group)
        return total[rank * ctx.rows:(rank + 1) * ctx.rows], None


def gather_with_grad(x: torch.Tensor, group) -> torch.Tensor:
    return x if group is None else _GatherWithGrad.apply(x, group)


def global_sum(local: torch.Tensor, group) -> torch.Tensor:
    """The sum over ranks as value; the gradient flows only into this rank's share.

    Every rank thus holds the global loss, and each rank's gradients are its share of the
    global gradient: summed over ranks they are the single-process gradient exactly once.
    """
    if group is None:
        return local
    return local + (sum_ranks(local.detach(), group) - local.detach())
