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
    """Column blocks that travel rank → rank + 1, one part of `part_rows` rows at a time.

    Each rank's block is cut into parts; part p of every rank goes once around the ring (at step k
    this rank holds part p of rank (rank − k) mod world), then part p + 1. Iterating yields
    (global row offset, tensors) for every part of every rank's block, while the next one is
    already being received (exchange overlaps compute). Results that belong to a block's owner
    (column statistics, column gradients) travel with their part: `take(fresh)` returns the
    accumulators for the part held now (fresh ones for this rank's own part, else those the
    previous ranks filled), the caller adds its share in place, and `give` passes them on; after
    the iteration `carried` holds this rank's own block's totals, parts joined. A rank thus holds
    its own block, and of the parts only the current one, the one arriving and two sets of
    accumulators: parts of `chunk` rows keep the ring's memory near O(B_local·D) with a small
    constant. Without a group (or with `enabled=False`) it is one block at offset 0: the
    all-gathered columns.
    """

    SLOTS = 8  # tag space per step: features in the low half, accumulators in the high half

    def __init__(self, tensors: list[torch.Tensor], group, enabled: bool = True, part_rows: int | None = None):
        self.tensors = tensors
        self.rank, self.world = rank_and_world(group if enabled else None)
        self.group = group if enabled and self.world > 1 else None
        self.rows = tensors[0].shape[0]
        self.part_rows = part_rows if self.group is not None and part_rows else self.rows
        self.step = 0  # counts every exchange step, so each message has its own tag
        self._carried: list[torch.Tensor] | None = None
        self._first = True
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
        for p0 in range(0, self.rows, self.part_rows):
            p1 = min(self.rows, p0 + self.part_rows)
            current = [t[p0:p1].contiguous() for t in self.tensors]
            for k in range(self.world):
                self.step += 1
                self._settle(self.step)
                following = []
                if k + 1 < self.world:
                    tag = self.step * self.SLOTS
                    for i, t in enumerate(current):
                        self._isend(t, tag + i)
                    following = [self._irecv(torch.empty_like(t), tag + i) for i, t in enumerate(current)]
                self._first = k == 0
                yield ((self.rank - k) % self.world) * self.rows + p0, current
                current = arrived(following)
            self._keep(p0, p1, arrived(self._arriving) if self.group is not None else self._arriving)
        self._settle(self.step + 1)

    def _keep(self, p0: int, p1: int, totals: list[torch.Tensor]) -> None:
        """This rank's own part's totals, back from the ring, into the joined `carried`."""
        if not totals:
            return
        if self.part_rows == self.rows:
            self._carried = totals
            return
        if self._carried is None:
            self._carried = [t.new_empty((self.rows,) + t.shape[1:]) for t in totals]
        for whole, part in zip(self._carried, totals):
            whole[p0:p1] = part

    @property
    def carried(self) -> list[torch.Tensor]:
        """This rank's own block's totals, once the iteration (with `give` at every step) is over."""
        assert self._carried is not None, "Ring.carried read before any accumulators came back"
        return self._carried

    def take(self, fresh) -> list[torch.Tensor]:
        if self._first or self.group is None:
            return fresh()
        return arrived(self._arriving)

    def give(self, accumulators: list[torch.Tensor]) -> None:
        if self.group is None:
            self._arriving = accumulators
            return
        tag = self.step * self.SLOTS + self.SLOTS // 2
        for i, t in enumerate(accumulators):
            self._isend(t, tag + i)
        # the next step's part's accumulators (after a part's last step: this rank's own) come from the previous rank
        self._arriving = [self._irecv(torch.empty_like(t), tag + i) for i, t in enumerate(accumulators)]


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


@torch.no_grad()
def fetch_rows(x: torch.Tensor, indices: torch.Tensor, group) -> torch.Tensor:
    """Rows `indices` (global, any shape, repeats allowed) of the row-sharded global x, each fetched from its
    owner: all-to-alls of the counts, the indices out and the rows back; O(indices·D) per rank."""
    _, world = rank_and_world(group)
    n, flat = x.shape[0], indices.flatten()
    order = torch.argsort(flat // n, stable=True)  # requests grouped by owner rank
    wanted = flat[order]
    send = torch.bincount(wanted // n, minlength=world)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    asked = torch.empty(int(recv.sum()), dtype=wanted.dtype, device=wanted.device)
    dist.all_to_all_single(asked, wanted % n, recv.tolist(), send.tolist(), group=group)
    got = x.new_empty((len(flat),) + x.shape[1:])
    dist.all_to_all_single(got, x[asked].contiguous(), send.tolist(), recv.tolist(), group=group)
    out = torch.empty_like(got)
    out[order] = got
    return out.view(indices.shape + x.shape[1:])


def permuted_rows(x: torch.Tensor, perm: torch.Tensor, group) -> torch.Tensor:
    return _PermutedRows.apply(x, perm, group)
