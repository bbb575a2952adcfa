"""What the machine a bench ran on is and can do: its CPU model and its measured GEMM rate.

The README's tables say which machine gave them: CPUs of one name differ (a Zen 4's bf16 GEMM is 2.2x its
fp32 one, a Zen 5's 4.6x), so the rate is measured on the spot, not looked up.
"""
from __future__ import annotations

import time
from pathlib import Path


def cpu_model() -> str:
    """'AMD EPYC (family 25, model 17)': the model name alone does not tell a Zen 4 from a Zen 5."""
    info = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines() if ":" in line)
    info = {k.strip(): v.strip() for k, v in info.items()}
    return f"{info.get('model name', 'unknown CPU')} (family {info.get('cpu family', '?')}, model {info.get('model', '?')})"


def gemm_flops(dim: int, dtype: str, threads: int = 0, n: int = 1024, repeats: int = 20) -> float:
    """Measured GEMM FLOP/s of this machine for n×dim @ dim×n in `dtype` (the loss bench: its tile shape)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    kind = torch.bfloat16 if dtype == "bf16" else torch.float32
    x, y = torch.randn(n, dim).to(kind), torch.randn(dim, n).to(kind)
    _ = x @ y  # warm-up
    best = float("inf")
    for _ in range(repeats):  # the best of several: the rate the machine reaches, not a slow spell on it
        t0 = time.perf_counter()
        _ = x @ y
        best = min(best, time.perf_counter() - t0)
    return 2 * n * n * dim / best
