"""Per-sample values kept across epochs (a loss's running statistics), sharded over ranks by sample index.

Sample `i` lives on rank `i % world`, row `i // world`, so every rank holds ~num_samples/world
rows whatever the dataset size. A step moves only the batch's (row, value) pairs to and from
their owners with all-to-alls: O(local batch) scalars per rank. Saved shards can be loaded
into any number of ranks (each rank picks the indices it now owns out of every saved shard).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.losses.comm import rank_and_world


class _AllToAll(torch.autograd.Function):
    """Rows `send[r]` to rank r; backward sends the gradients back the way the rows came."""

    @staticmethod
    def forward(ctx, x, send, recv, group):
        ctx.splits = (send, recv, group)
        return _all_to_all(x, send, recv, group)

    @staticmethod
    def backward(ctx, g):
        send, recv, group = ctx.splits
        return _all_to_all(g.contiguous(), recv, send, group), None, None, None


def _all_to_all(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
    return out


class _Route:
    """Where a batch's sample indices live, and which rows other ranks ask of this one."""

    def __init__(self, indices: torch.Tensor, world: int, group):
        owner = indices % world
        self.order = torch.argsort(owner, stable=True)
        self.unorder = torch.argsort(self.order)
        send = torch.bincount(owner, minlength=world)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=group)
        self.send: list[int] = send.tolist()
        self.recv: list[int] = recv.tolist()
        self.asked_rows = _all_to_all((indices // world)[self.order], self.send, self.recv, group)


class SampleTable:
    """A [num_samples, width] table of this rank's shard; `trainable` makes it a (sparse-gradient) Parameter.

    `lookup` returns the batch's rows (differentiable into the shard when trainable: the
    gradient arrives as a sparse tensor holding only the rows of the step, for SparseAdam);
    `write` stores new rows. Every rank calls both collectively, with its local batch's indices.
    The shard lives on `device` (with NCCL, the rank's GPU: its collectives move only CUDA tensors).
    """

    def __init__(self, num_samples: int, width: int, fill: float, *, trainable: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", group=None):
        self.num_samples, self.group = num_samples, group
        self.rank, self.world = rank_and_world(group)
        rows = math.ceil(max(num_samples - self.rank, 0) / self.world)
        values = torch.full((rows, width), fill, dtype=dtype, device=device)
        self.values = torch.nn.Parameter(values) if trainable else values

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        indices = self._check(indices)
        if self.group is None:
            return self._read(indices)
        route = _Route(indices, self.world, self.group)
        answers = self._read(route.asked_rows)
        return _AllToAll.apply(answers, route.recv, route.send, self.group)[route.unorder]

    def write(self, indices: torch.Tensor, rows: torch.Tensor) -> None:
        """Store `rows` [n, width] for `indices`; a sample twice in the batch keeps one of its rows."""
        indices, rows = self._check(indices), rows.to(self.values.device)
        with torch.no_grad():
            if self.group is None:
                self.values[indices] = rows.to(self.values.dtype)
                return
            route = _Route(indices, self.world, self.group)
            arrived = _all_to_all(rows.to(self.values.dtype)[route.order], route.send, route.recv, self.group)
            self.values[route.asked_rows] = arrived

    def _read(self, rows: torch.Tensor) -> torch.Tensor:
        if isinstance(self.values, torch.nn.Parameter):
            return F.embedding(rows, self.values, sparse=True)
        return self.values[rows]

    def _check(self, indices: torch.Tensor) -> torch.Tensor:
        indices = indices.to(self.values.device, torch.long)
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.num_samples):
            raise ValueError(f"sample index {int(indices.max())} outside [0, {self.num_samples}): the table "
                             "must be sized to the dataset's number of samples")
        return indices

    def shard_indices(self) -> torch.Tensor:
        return torch.arange(self.values.shape[0], device=self.values.device) * self.world + self.rank

    def state_dict(self) -> dict:
        return {"num_samples": self.num_samples, "world": self.world, "rank": self.rank,
                "values": self.values.detach().clone()}

    def load_state_dict(self, shards: list[dict]) -> None:
        """Restore from every rank's saved `state_dict()`, saved under any number of ranks."""
        worlds = {s["world"] for s in shards}
        if len(worlds) != 1 or sorted(s["rank"] for s in shards) != list(range(worlds.pop())):
            raise ValueError("load_state_dict needs the shards of every saved rank, each once")
        if any(s["num_samples"] != self.num_samples for s in shards):
            raise ValueError(f"saved table has {shards[0]['num_samples']} samples, this one {self.num_samples}")
        with torch.no_grad():
            for s in shards:
                saved = torch.arange(s["values"].shape[0]) * s["world"] + s["rank"]
                mine = saved % self.world == self.rank
                self.values[(saved[mine] // self.world).to(self.values.device)] = s["values"][mine].to(self.values)
