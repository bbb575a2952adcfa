"""Bench rows for the global contrastive loss and mined negatives against the plain tiled losses.

`run_small_batch_bench(batch, dim, out_dir)` times forward+backward (and, for the global loss,
the state's lookup and commit; for mined negatives, the no-grad top-k sweep and the mixing)
in a fresh subprocess per run after a warm-up call, interleaving the implementations and reporting
the median of `repeats` runs; extra memory is the peak allocated above the inputs, as in `mmclip
bench loss` (`PeakMemory`). `mmclip bench loss --kind small_batch --batch 16384` runs it. The
mining sweep is also timed alone, as a fraction of the plain clip loss.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

PROBE = r"""
import json, sys, time, torch
import torch.nn.functional as F
from pipeline.losses import clip_loss, siglip_loss
from pipeline.losses import loss_config
from pipeline.losses.objectives.global_clip import GlobalClip
from pipeline.losses.objectives.mined_negatives import MinedNegatives
from pipeline.losses.tiles import TileSpec, top_k_negatives
from pipeline.bench.loss import PeakMemory
impl, B, D, K, S, S2 = sys.argv[1], *map(int, sys.argv[2:7])
torch.manual_seed(0)
a, b = (F.normalize(torch.randn(B, D), dim=-1).requires_grad_() for _ in range(2))
scale, bias = torch.tensor(14.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
a.grad, b.grad = torch.zeros_like(a), torch.zeros_like(b)  # the inputs' gradients are not the loss's memory
indices = torch.randperm(10 * B)[:B]
gcl = GlobalClip(loss_config("global_clip", temperature=impl.split("_")[-1], temperature_lr=1e-3),
                 num_samples=10 * B) if impl.startswith("global") else None
mined = MinedNegatives(top_k=K, mixed=S, mix_with_anchor=S2)
def step(a, b, indices):
    if impl == "top_k_sweep":  # the mining sweep alone: no loss, no backward
        values, _ = top_k_negatives(a, b, K, TileSpec.resolve(a.device))
        return values.sum().requires_grad_()
    if gcl is not None:
        loss = gcl.anchor_loss(a, b, scale, indices, step=0)
        loss.backward()
        gcl.commit()
        return loss
    negs = mined(a, b, step=0, generator=torch.Generator().manual_seed(0)) if impl.startswith("mined") else None
    loss = (clip_loss(a, b, scale, hard_negatives=negs) if impl.endswith("clip")
            else siglip_loss(a, b, scale, bias, hard_negatives=negs))
    loss.backward()
    return loss
step(a[:1024].detach().requires_grad_(), b[:1024].detach().requires_grad_(), indices[:1024])  # warm-up
scale.grad = bias.grad = None
with PeakMemory() as memory:
    t0 = time.perf_counter()
    loss = step(a, b, indices)
    seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "extra_mib": memory.extra_mib, "loss": loss.item()}))
"""

IMPLS = {
    "clip": "clip_loss (plain tiled)",
    "global_clip_global": "global_clip, global τ",
    "global_clip_individual": "global_clip, per-sample τ",
    "top_k_sweep": "top-k mining sweep alone (no grad)",
    "mined_clip": "clip_loss + mined negatives",
    "siglip": "siglip_loss (plain tiled)",
    "mined_siglip": "siglip_loss + mined negatives",
}
BASELINE = {"clip": "clip", "global_clip_global": "clip", "global_clip_individual": "clip", "top_k_sweep": "clip",
            "mined_clip": "clip", "siglip": "siglip", "mined_siglip": "siglip"}


def _probe(impl: str, batch: int, dim: int, k: int, s: int, s2: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, impl, str(batch), str(dim), str(k), str(s), str(s2)],
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    if proc.returncode != 0:
        raise RuntimeError(f"bench probe {impl} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_small_batch_bench(batch: int = 16384, dim: int = 512, out_dir: str = "docs/bench", repeats: int = 3,
                          top_k: int = 16, mixed: int = 8, mix_with_anchor: int = 4) -> dict:
    runs: dict[str, list[dict]] = {impl: [] for impl in IMPLS}
    for _ in range(repeats):  # interleaved, so a noisy neighbour slows every implementation alike
        for impl in IMPLS:
            runs[impl].append(_probe(impl, batch, dim, top_k, mixed, mix_with_anchor))
    rows = {impl: {"seconds": statistics.median(r["seconds"] for r in rs),
                   "extra_mib": statistics.median(r["extra_mib"] for r in rs), "loss": rs[0]["loss"]}
            for impl, rs in runs.items()}
    report = {"batch": batch, "dim": dim, "repeats": repeats, "cpus": os.cpu_count(),
              "mined": {"top_k": top_k, "mixed": mixed, "mix_with_anchor": mix_with_anchor}, "rows": rows}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loss_small_batch.json").write_text(json.dumps(report, indent=2))
    (out / "loss_small_batch.md").write_text(markdown(report))
    print(markdown(report))
    return report


def markdown(report: dict) -> str:
    m = report["mined"]
    lines = [f"Forward+backward at B={report['batch']:,}, D={report['dim']}, fp32, {report['cpus']} CPU cores, "
             f"median of {report['repeats']} interleaved runs; mined: top_k={m['top_k']}, mixed={m['mixed']}, "
             f"mix_with_anchor={m['mix_with_anchor']}.", "",
             "| loss | seconds | × plain | extra MiB | extra MiB − plain |", "|---|---|---|---|---|"]
    for impl, label in IMPLS.items():
        row, base = report["rows"][impl], report["rows"][BASELINE[impl]]
        lines.append(f"| {label} | {row['seconds']:.2f} | {row['seconds'] / base['seconds']:.2f}× | "
                     f"{row['extra_mib']:.0f} | {row['extra_mib'] - base['extra_mib']:+.0f} |")
    return "\n".join(lines) + "\n"
