"""`mmclip bench loss`: forward+backward time and peak extra memory, tiled vs reference, one run.

Every (implementation, batch) pair runs in a fresh subprocess, so its peak resident memory
(ru_maxrss) minus the resident memory after the inputs exist is the extra memory of that loss
alone. References that cannot fit in this machine's RAM are skipped, not crashed. The GEMM
FLOP limit is measured on the spot: the tiled loss does 4 GEMMs of B×B×D (forward, and
recompute + two gradient GEMMs in backward), once per anchor modality for Symile.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

PROBE = r"""
import json, resource, sys, time, torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss
from symile import Symile
from pipeline.losses import clip_loss, siglip_loss, symile_loss
kind, impl, B, D = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
n_mod = 3 if kind == "symile" else 2
def run():
    torch.manual_seed(0)
    feats = [F.normalize(torch.randn(B, D), dim=-1).detach().requires_grad_() for _ in range(n_mod)]
    scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    grads = [torch.zeros_like(f) for f in feats]  # the inputs' gradients are not the loss's extra memory
    base_kib = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0])
    t0 = time.perf_counter()
    if impl == "mmclip":
        loss = {"clip": lambda: clip_loss(feats[0], feats[1], scale),
                "siglip": lambda: siglip_loss(feats[0], feats[1], scale, bias),
                "symile": lambda: symile_loss(feats, scale, negatives="n", generator=torch.Generator().manual_seed(0))}[kind]()
    else:
        loss = {"clip": lambda: ClipLoss()(feats[0], feats[1], scale),
                "siglip": lambda: SigLipLoss()(feats[0], feats[1], scale, bias),
                "symile": lambda: Symile("n")(feats, scale)}[kind]()
    for f, g in zip(feats, grads):
        f.grad = g
    loss.backward()
    seconds = time.perf_counter() - t0
    return seconds, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kib) / 1024, loss.item()
seconds, extra, value = run()
print(json.dumps({"seconds": seconds, "extra_mib": max(extra, 0.0), "loss": value}))
"""

REFERENCE = {"clip": "open_clip ClipLoss", "siglip": "open_clip SigLipLoss", "symile": "symile.Symile('n')"}


def gemm_flops(dim: int, n: int = 2048, repeats: int = 5) -> float:
    """Measured fp32 GEMM FLOP/s of this machine at the tile shape the loss uses."""
    import torch

    x, y = torch.randn(n, dim), torch.randn(dim, n)
    x @ y
    t0 = time.perf_counter()
    for _ in range(repeats):
        x @ y
    return 2 * n * n * dim * repeats / (time.perf_counter() - t0)


def reference_fits(batch: int, n_mod: int) -> bool:
    """The references hold a few B×B fp32 matrices (logits, softmax, their grads): keep 25% headroom."""
    need = 5 * batch * batch * 4 * (n_mod - 1)
    return need < 0.75 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def measure(kind: str, impl: str, batch: int, dim: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, kind, impl, str(batch), str(dim)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_loss_bench(kind: str, batches: list[int], dim: int, out_dir: str) -> list[dict]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    flops = gemm_flops(dim)
    n_mod = 3 if kind == "symile" else 2
    rows = []
    for batch in batches:
        ours = measure(kind, "mmclip", batch, dim)
        ref = measure(kind, "reference", batch, dim) if reference_fits(batch, n_mod) else {"skipped": "does not fit in RAM"}
        sweeps = n_mod if kind == "symile" else 1  # Symile: one B×B sweep per anchor modality
        gemm_seconds = 4 * 2 * batch * batch * dim * sweeps / flops
        rows.append({"batch": batch, "dim": dim, "mmclip": ours, "reference": ref,
                     "gemm_limit_seconds": gemm_seconds})
        print(json.dumps(rows[-1]), flush=True)
    report = {"kind": kind, "reference": REFERENCE[kind], "gemm_gflops": flops / 1e9, "cpus": os.cpu_count(),
              "rows": rows}
    (out / f"loss_{kind}.json").write_text(json.dumps(report, indent=2))
    (out / f"loss_{kind}.md").write_text(markdown(report))
    plot(report, out / f"loss_{kind}.png")
    print(markdown(report))
    return rows


def _cell(r: dict, key: str, fmt: str) -> str:
    if "skipped" in r:
        return "skipped (" + r["skipped"] + ")"
    if "error" in r:
        return "failed: " + r["error"][:40]
    return format(r[key], fmt)


def markdown(report: dict) -> str:
    lines = [f"`{report['kind']}` loss, forward+backward, fp32, D={report['rows'][0]['dim']}, "
             f"{report['cpus']} CPU cores, measured GEMM rate {report['gemm_gflops']:.0f} GFLOP/s.", "",
             f"| B | mmclip s | {report['reference']} s | mmclip extra MiB | reference extra MiB | "
             "mmclip / GEMM limit |", "|---|---|---|---|---|---|"]
    for row in report["rows"]:
        ours, ref = row["mmclip"], row["reference"]
        ratio = f"{ours['seconds'] / row['gemm_limit_seconds']:.2f}×" if "seconds" in ours else "-"
        lines.append(f"| {row['batch']:,} | {_cell(ours, 'seconds', '.2f')} | {_cell(ref, 'seconds', '.2f')} | "
                     f"{_cell(ours, 'extra_mib', '.0f')} | {_cell(ref, 'extra_mib', '.0f')} | {ratio} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for impl, label in (("mmclip", "mmclip (tiled)"), ("reference", report["reference"])):
        pts = [(r["batch"], r[impl]) for r in report["rows"] if "seconds" in r[impl]]
        if pts:
            axes[0].plot([b for b, _ in pts], [m["seconds"] for _, m in pts], "o-", label=label)
            axes[1].plot([b for b, _ in pts], [max(m["extra_mib"], 1) for _, m in pts], "o-", label=label)
    for ax, ylabel in zip(axes, ("forward+backward seconds", "extra memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("global batch B")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{report['kind']} loss, D={report['rows'][0]['dim']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
