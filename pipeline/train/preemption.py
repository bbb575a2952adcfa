"""Preemption: SIGUSR1 (Slurm's warning before the time limit) or SIGTERM -> checkpoint, then exit.

The handler only sets a flag; the loop checks it between steps and all ranks agree (any rank
signalled means all stop at the same step), so the checkpoint is consistent.
"""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist


class PreemptionFlag:
    def __init__(self, signals=(signal.SIGUSR1, signal.SIGTERM)):
        self.received: int | None = None
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def any_rank(self) -> bool:
        """True if any rank got a signal (a collective: call it on every rank at the same point)."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
