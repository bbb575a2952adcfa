"""`mmclip bench loss --ranks W`: all-gather vs ring over W gloo processes on this machine.

Each rank holds B/W rows; a cell starts W fresh processes (torch threads: CPU cores ÷ W, at least
one), each measuring, after a warm-up call, its peak allocated memory (`PeakMemory` of
pipeline.bench.loss) above its inputs and their gradient buffers, and its forward+backward time
between two barriers. The report takes the largest rank of each cell and the median of `repeats`
interleaved rounds.
"""
from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path

PROBE = r"""
import json, os, sys, time, torch, torch.distributed as dist
import torch.nn.functional as F
from pipeline.losses import clip_loss, siglip_loss, symile_loss
from pipeline.bench.loss import PeakMemory
kind, mode, dtype, B, D, rank, world, port = sys.argv[1:4] + [int(x) for x in sys.argv[4:9]]
torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
dist.init_process_group("gloo", rank=rank, world_size=world)
n_mod = 3 if kind == "symile" else 2
g = torch.Generator().manual_seed(rank)
cast = torch.bfloat16 if dtype == "bf16" else torch.float32
feats = [F.normalize(torch.randn(B // world, D, generator=g), dim=-1).to(cast).requires_grad_() for _ in range(n_mod)]
scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
for f in feats:
    f.grad = torch.zeros_like(f)  # the inputs' gradients are not the loss's extra memory
kw = {"group": dist.group.WORLD, "distributed": mode}
def run(feats):
    return {"clip": lambda: clip_loss(feats[0], feats[1], scale, **kw),
            "siglip": lambda: siglip_loss(feats[0], feats[1], scale, bias, **kw),
            "symile": lambda: symile_loss(feats, scale, negatives="n", generator=torch.Generator().manual_seed(0),
                                          **kw)}[kind]()
run([f[:1024].detach().requires_grad_() for f in feats]).backward()  # warm-up: gloo, GEMM kernels, tile buffers
dist.barrier()
with PeakMemory() as memory:
    t0 = time.perf_counter()
    loss = run(feats)
    loss.backward()
    dist.barrier()
    seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "loss": loss.item(), "extra_mib": memory.extra_mib}), flush=True)
dist.barrier()
os._exit(0)  # both ranks are done: skip gloo's teardown, which once aborted a rank at exit (std::terminate)
"""

MODES = ("gather", "ring")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(kind: str, mode: str, dtype: str, batch: int, dim: int, world: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", PROBE, kind, mode, dtype, str(batch), str(dim), str(r),
                               str(world), str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for r in range(world)]
    outs = [p.communicate() for p in procs]
    if any(p.returncode for p in procs):
        err = next(e for p, (_, e) in zip(procs, outs) if p.returncode).strip().splitlines()
        return {"error": err[-1] if err else "a rank failed"}
    ranks = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
    return {"seconds": max(r["seconds"] for r in ranks), "extra_mib": max(r["extra_mib"] for r in ranks),
            "loss": ranks[0]["loss"]}


def run_ranks_bench(kind: str, batch: int, dim: int, world: int, out_dir: str, dtype: str = "fp32",
                    repeats: int = 3) -> dict:
    runs = {mode: [] for mode in MODES}
    for _ in range(repeats):  # interleaved, so a slow spell on the shared machine hits both modes
        for mode in MODES:
            runs[mode].append(measure(kind, mode, dtype, batch, dim, world))
            print(json.dumps({"mode": mode, **runs[mode][-1]}), flush=True)
    cells = {}
    for mode, rs in runs.items():
        ok = [r for r in rs if "seconds" in r]
        cells[mode] = ({"seconds": statistics.median(r["seconds"] for r in ok),
                        "extra_mib": statistics.median(r["extra_mib"] for r in ok), "loss": ok[0]["loss"],
                        "runs": [r["seconds"] for r in ok]} if ok else rs[0])
    report = {"kind": kind, "dtype": dtype, "batch": batch, "dim": dim, "world": world, "repeats": repeats,
              "cpus": os.cpu_count(), "modes": cells}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"loss_{kind}_ranks{world}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (out / f"{stem}.md").write_text(markdown(report))
    plot(report, out / f"{stem}.png")
    print(markdown(report))
    return report


def markdown(report: dict) -> str:
    gather = report["modes"]["gather"]
    lines = [f"`{report['kind']}` loss over {report['world']} gloo ranks on {report['cpus']} CPU cores, {report['dtype']}, "
             f"global B={report['batch']:,}, D={report['dim']} ({report['batch'] // report['world']:,} rows a rank); "
             f"largest rank, median of {report['repeats']} interleaved runs.", "",
             "| columns | per-rank extra MiB | vs gather | forward+backward s | vs gather |", "|---|---|---|---|---|"]
    for mode, cell in report["modes"].items():
        if "seconds" not in cell:
            lines.append(f"| {mode} | failed: {cell.get('error', '')[:40]} | | | |")
            continue
        ratio = lambda key, c=cell: f"{c[key] / gather[key]:.2f}×" if "seconds" in gather else "-"  # noqa: E731
        lines.append(f"| {mode} | {cell['extra_mib']:.0f} | {ratio('extra_mib')} | {cell['seconds']:.2f} | "
                     f"{ratio('seconds')} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m, c in report["modes"].items() if "seconds" in c]
    fig, axes = plt.subplots(1, 2, figsize=(7, 3))
    for ax, key, label in zip(axes, ("extra_mib", "seconds"), ("per-rank extra memory (MiB)", "forward+backward s")):
        ax.bar(modes, [report["modes"][m][key] for m in modes], color=["tab:blue", "tab:orange"][:len(modes)])
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{report['kind']} loss, {report['world']} ranks, global B={report['batch']:,}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
