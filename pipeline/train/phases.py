"""Where a training step's wall time goes: data wait, forward, loss, backward, optimizer (`train.phase_times`).

Each phase is timed at its boundaries; on CUDA that needs a synchronisation per boundary (kernels run
asynchronously), which removes the host/device overlap, so the split is opt-in. Under GradCache the
forward counts both encodes (the no-grad one and the re-encode); without it (one chunk) the loss's own
backward is part of the backward phase.
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext

import torch

PHASES = ("data", "forward", "loss", "backward", "optimizer")  # and "other": the step's time outside them


class PhaseTimes:
    """Seconds per phase summed over a log window; `window()` returns the per-step means and starts a new one."""

    def __init__(self, enabled: bool, device: torch.device | None):
        self.enabled = enabled
        self.cuda = device is not None and device.type == "cuda"
        self.sums: dict[str, float] = defaultdict(float)

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    @contextmanager
    def _timed(self, phase: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.sums[phase] += time.perf_counter() - start

    def __call__(self, phase: str):
        """A context manager timing `phase` (a no-op when the split is off)."""
        return self._timed(phase) if self.enabled else nullcontext()

    def window(self, steps: int) -> dict[str, float]:
        """{"time/<phase>_ms": mean milliseconds per step} since the last window; phases are timed inside a
        "step" span, and what the step spent outside them (moving the batch, the loss's bookkeeping) is "other"."""
        if not self.enabled or not steps:
            return {}
        means = {f"time/{p}_ms": 1000 * self.sums.get(p, 0.0) / steps for p in PHASES}
        means["time/other_ms"] = max(0.0, 1000 * self.sums.get("step", 0.0) / steps - sum(means.values()))
        self.sums.clear()
        return means
