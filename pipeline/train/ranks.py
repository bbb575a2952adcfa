"""What the ranks of one run agree on, and how a failing rank stops the others.

Every helper here is a collective (call it on every rank at the same point) or a no-op on one
process. A rank that fails posts its one-line error in the rendezvous store; the other ranks poll
it from a thread and exit at once with that line, instead of waiting in a collective until the
process-group timeout (`train.collective_timeout_s`, the bound for every other kind of hang).
"""
from __future__ import annotations

import os
import sys
import threading
import time
from collections import Counter
from typing import Any

import torch
import torch.distributed as dist

from pipeline.errors import UserError

FAILED_KEY = "mmclip/failed"


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if distributed():
        dist.barrier()


def any_rank(flag: float) -> float:
    """The largest `flag` over ranks (e.g. a signal number, 0 for none)."""
    value = torch.tensor([float(flag)])
    if distributed():
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.item()


def sum_over_ranks(counter: Counter) -> Counter:
    if not distributed():
        return counter
    gathered: list[Any] = [None] * dist.get_world_size()  # filled with each rank's dict
    dist.all_gather_object(gathered, dict(counter))
    return sum((Counter(c) for c in gathered), Counter())


def decide_on_rank0(fn):
    """Run `fn` on rank 0 only and give every rank its result (or its UserError): all ranks take one path."""
    result: list[Any] = [None, None]  # fn's value, the UserError's line
    if not distributed() or dist.get_rank() == 0:
        try:
            result[0] = fn()
        except UserError as exc:
            result[1] = str(exc)
    if distributed():
        dist.broadcast_object_list(result, src=0)
    if result[1] is not None:
        raise UserError(result[1])
    return result[0]


class PeerWatch:
    """Polls the rendezvous store for a peer's failure; `post` announces this rank's own."""

    def __init__(self, rank: int, poll_seconds: float = 1.0):
        self.rank, self.poll = rank, poll_seconds
        self.store = dist.distributed_c10d._get_default_store() if distributed() else None
        self.done = threading.Event()
        self.stopping = threading.Lock()
        if self.store is not None:
            threading.Thread(target=self._watch, name="mmclip-peer-watch", daemon=True).start()

    def _peer_failure(self) -> str | None:
        assert self.store is not None  # called only with a store (the watch thread, `post`)
        return self.store.get(FAILED_KEY).decode() if self.store.check([FAILED_KEY]) else None

    def _watch(self) -> None:
        while not self.done.wait(self.poll):
            try:
                message = self._peer_failure()
            except Exception:  # the store lives in rank 0's process: it is gone, so is rank 0
                if self.done.is_set():
                    return
                message = "lost contact with rank 0 (it hosts the rendezvous); see its output for why"
            if message and not self.done.is_set():
                self._stop(message)

    def _stop(self, message: str) -> None:
        """Exit with the peer's line, once: the watch thread and a collective failing under the main
        thread can both get here. Rank 0 lingers a moment since the store other ranks read dies with it."""
        with self.stopping:
            print(f"mmclip: error: rank {self.rank} stops: {message}", file=sys.stderr, flush=True)
            if self.rank == 0:
                time.sleep(3 * self.poll)
            os._exit(1)

    def post(self, message: str) -> None:
        """Tell the other ranks this one failed, unless a peer failed first: then this rank's error
        (a collective broken by the peer's exit) is a consequence, and the peer's line is reported."""
        if self.store is None:
            return
        try:
            peer = self._peer_failure()
        except Exception:
            peer = None
        if peer:
            self._stop(peer)
        self.done.set()
        try:
            self.store.set(FAILED_KEY, f"rank {self.rank} failed: {message}")
        except Exception:
            return
        if self.rank == 0:
            time.sleep(3 * self.poll)

    def stop(self) -> None:
        """The run is over on this rank: peers leaving (and rank 0's store closing) is no longer a failure."""
        self.done.set()
