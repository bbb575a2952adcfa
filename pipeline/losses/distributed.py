"""Collectives the tiled losses use: all communication is O(B·D) features or O(B) statistics.

The all-gather mode gives every rank all columns; the ring (`Ring`, `permuted_rows`) passes
column blocks between neighbours so a rank never holds more than O(B_local·D).
"""
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


def arrived(receiving: list) -> list[torch.Tensor]:
    """The tensors of (tensor, irecv request) pairs, once they are all in."""
    for _, req in receiving:
        req.wait()
    return [t for t, _ in receiving]


class Ring:
    """Column blocks that travel rank → rank + 1: at step k this rank holds block (rank − k) mod world.

    Iterating yields (owner rank, that owner's tensors) for every rank's block, this rank's own
    first, while the next block is already being received (exchange overlaps compute). Results
    that belong to a block's owner (column statistics, column gradients) travel with the block:
    `take(fresh)` returns the accumulators for the block held now (fresh ones for this rank's own
    block, else those the previous ranks filled), the caller adds its part in place, and `give`
    passes them on; after the last step `carried` holds this rank's own block's totals. Without a
    group (or with `enabled=False`) it is one block at offset 0: the all-gathered columns. A rank
    holds its own block, the current one, the one arriving, and two sets of accumulators.
    """

    SLOTS = 8  # tag space per step: features in the low half, accumulators in the high half

    def __init__(self, tensors: list[torch.Tensor], group, enabled: bool = True):
        self.tensors = [t.contiguous() for t in tensors]
        self.rank, self.world = rank_and_world(group if enabled else None)
        self.group = group if enabled and self.world > 1 else None
        self.step = 0
        self.carried: list[torch.Tensor] | None = None
        self._sends: list = []
        self._arriving: list = []

    def _isend(self, t: torch.Tensor, tag: int) -> None:
        req = dist.isend(t, group=self.group, group_dst=(self.rank + 1) % self.world, tag=tag)
        self._sends.append((self.step, req))

    def _irecv(self, t: torch.Tensor, tag: int):
        return t, dist.irecv(t, group=self.group, group_src=(self.rank - 1) % self.world, tag=tag)

    def _settle(self, before_step: int) -> None:
        """Wait for the sends of steps before `before_step`, so their buffers can go."""
        for step, req in self._sends:
            if step < before_step:
                req.wait()
        self._sends = [(step, req) for step, req in self._sends if step >= before_step]

    def __iter__(self):
        current = self.tensors
        for k in range(self.world):
            self.step = k
            self._settle(k)
            following = []
            if k + 1 < self.world:
                for i, t in enumerate(current):
                    self._isend(t, k * self.SLOTS + i)
                following = [self._irecv(torch.empty_like(t), k * self.SLOTS + i) for i, t in enumerate(current)]
            yield (self.rank - k) % self.world, current
            current = arrived(following)
        if self.group is not None and self._arriving:
            self.carried = arrived(self._arriving)
        self._settle(self.world)

    def take(self, fresh) -> list[torch.Tensor]:
        if self.step == 0 or self.group is None:
            return fresh()
        return arrived(self._arriving)

    def give(self, accumulators: list[torch.Tensor]) -> None:
        if self.group is None:
            self.carried = accumulators
            return
        base = self.step * self.SLOTS + self.SLOTS // 2
        for i, t in enumerate(accumulators):
            self._isend(t, base + i)
        # the next step's block's accumulators (after the last step: this rank's own) come from the previous rank
        self._arriving = [self._irecv(torch.empty_like(t), base + i) for i, t in enumerate(accumulators)]


DISTRIBUTED_MODES = ("auto", "gather", "ring")


def use_ring(mode: str, group) -> bool:
    """With "auto", the ring from 3 ranks on (4 ranks: half the per-rank memory, 1.03x the time)."""
    if mode not in DISTRIBUTED_MODES:
        raise ValueError(f"distributed must be one of {DISTRIBUTED_MODES}, got {mode!r}")
    world = rank_and_world(group)[1]
    return world > 1 and (mode == "ring" or (mode == "auto" and world > 2))


class _PermutedRows(torch.autograd.Function):
    """Rows perm[rank·n:(rank+1)·n] of the row-sharded global x: one all-to-all of O(n·D) per rank."""

    @staticmethod
    def forward(ctx, x, perm, group):
        rank, world = rank_and_world(group)
        n = x.shape[0]
        wanted = perm.view(world, n)  # wanted[r]: the global rows rank r needs, in its order
        owner = wanted // n
        sent = [wanted[r][owner[r] == rank] - rank * n for r in range(world)]  # my rows, in r's order
        placed = [torch.nonzero(owner[rank] == q).flatten() for q in range(world)]  # where q's rows land here
        ctx.group, ctx.sent, ctx.placed = group, sent, placed
        return _exchange(x, sent, placed, group)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad, ctx.placed, ctx.sent, ctx.group), None, None


def _exchange(x, send_rows, recv_rows, group):
    """all_to_all: rank r gets x[send_rows[r]] of every rank, written at its own recv_rows[q]."""
    out = torch.empty_like(x)
    got = torch.empty((sum(len(r) for r in recv_rows),) + x.shape[1:], dtype=x.dtype, device=x.device)
    dist.all_to_all_single(got, x[torch.cat(send_rows)].contiguous(), [len(r) for r in recv_rows],
                           [len(r) for r in send_rows], group=group)
    out[torch.cat(recv_rows)] = got
    return out


def permuted_rows(x: torch.Tensor, perm: torch.Tensor, group) -> torch.Tensor:
    return _PermutedRows.apply(x, perm, group)
