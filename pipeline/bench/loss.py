"""`mmclip bench loss`: forward+backward time and peak extra memory, tiled vs reference, one run.

Every (implementation, dtype, batch) cell runs in a fresh subprocess; after a warm-up call, the
peak memory allocated during the loss above what was allocated before it (the inputs and their
gradient buffers; see `PeakMemory`) is the extra memory of that loss alone. Cells
are interleaved over `repeats` rounds and the median is reported. References that cannot fit in
this machine's RAM are skipped, not crashed. The GEMM FLOP limit is measured on the spot at the
tile shape: the tiled loss does 4 GEMMs of B×B×D (forward, and recompute + two
gradient GEMMs in backward), once per anchor modality for Symile.

`dtype="bf16"` runs the tiled loss on bf16 features beside its fp32 path and the reference under
`torch.autocast("cpu", dtype=torch.bfloat16)` (open_clip's amp_bf16), and measures each low-precision
result against a float64 evaluation of the same bf16 inputs: loss relative error, the lowest
cosine between a feature gradient and its float64 value, and the largest gradient error relative
to the largest float64 gradient entry.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from pipeline.bench.machine import gemm_flops

PROBE = r"""
import contextlib, json, sys, time, torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss
from symile import Symile
from pipeline.losses import clip_loss, siglip_loss, symile_loss
from pipeline.bench.loss import PeakMemory
kind, impl, dtype, B, D, check = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "1"
if int(sys.argv[7]):
    torch.set_num_threads(int(sys.argv[7]))
n_mod = 3 if kind == "symile" else 2
def loss_of(feats, scale, bias):
    torch.manual_seed(1)  # Symile("n") draws its permutations from the global RNG
    if impl == "mmclip":
        return {"clip": lambda: clip_loss(feats[0], feats[1], scale),
                "siglip": lambda: siglip_loss(feats[0], feats[1], scale, bias),
                "symile": lambda: symile_loss(feats, scale, negatives="n", generator=torch.Generator().manual_seed(0))}[kind]()
    return {"clip": lambda: ClipLoss()(feats[0], feats[1], scale),
            "siglip": lambda: SigLipLoss()(feats[0], feats[1], scale, bias),
            "symile": lambda: Symile("n")(feats, scale)}[kind]()
def leaves(values, dtype):
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    feats = [v.to(dtype).detach().requires_grad_() for v in values]
    s = 10.0 if kind == "siglip" else 100.0  # SigLIP's init scale; CLIP's trained (clamped) one
    return feats, torch.tensor(s, dtype=stat, requires_grad=True), torch.tensor(-10.0, dtype=stat, requires_grad=True)
torch.manual_seed(0)
base = F.normalize(torch.randn(B, D), dim=-1)  # pairs at cosine ~0.2: at s = 100 a loss near 1
values = [base] + [F.normalize(base + 5 * F.normalize(torch.randn(B, D), dim=-1), dim=-1) for _ in range(n_mod - 1)]
feats, scale, bias = leaves(values, torch.bfloat16 if dtype == "bf16" else torch.float32)
del values
grads = [torch.zeros_like(f) for f in feats]  # the inputs' gradients are not the loss's extra memory
autocast = impl == "reference" and dtype == "bf16"
amp = lambda: torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
with amp():  # warm-up: thread pools, GEMM kernels and their caches are not the loss's memory either
    warm = [f[:1024].detach().requires_grad_() for f in feats]
    warm_loss = loss_of(warm, scale, bias)
warm_loss.backward()
del warm, warm_loss
scale.grad = bias.grad = None
with PeakMemory() as memory:
    t0 = time.perf_counter()
    with amp():
        loss = loss_of(feats, scale, bias)
    for f, g in zip(feats, grads):
        f.grad = g
    loss.backward()
    seconds = time.perf_counter() - t0
out = {"seconds": seconds, "extra_mib": memory.extra_mib, "loss": loss.item()}
if check:
    exact, scale64, bias64 = leaves([f.detach() for f in feats], torch.float64)
    ref = loss_of(exact, scale64, bias64)
    ref.backward()
    pairs = [(f.grad.double().flatten(), e.grad.flatten()) for f, e in zip(feats, exact)]
    out.update(loss_rel_err=abs(loss.item() - ref.item()) / abs(ref.item()),
               grad_cosine=min(F.cosine_similarity(g, e, 0).item() for g, e in pairs),
               grad_max_rel_err=max(((g - e).abs().max() / e.abs().max()).item() for g, e in pairs))
print(json.dumps(out))
"""

class PeakMemory:
    """Peak memory the block allocates, in MiB above what was allocated when it began (`extra_mib`).

    Measured as bytes handed out by malloc (glibc's mallinfo2: heap in use + mmapped blocks), sampled
    every `interval` s by a thread (mallinfo2 walks the allocator's free lists under its locks, so
    sampling much faster slows the measured code; the peak holds for most of a backward pass). The
    resident size would also count what the allocator keeps after a free, which varies by 10-30 MiB
    from run to run. Where mallinfo2 is missing (not glibc ≥ 2.33) it
    falls back to the kernel's peak resident size (VmHWM, reset at the start).
    """

    def __init__(self, interval: float = 5e-3):
        import ctypes

        self.interval, self.peak, self._stop = interval, 0, None
        try:
            libc = ctypes.CDLL("libc.so.6")

            class MallInfo2(ctypes.Structure):
                _fields_ = [(name, ctypes.c_size_t) for name in (
                    "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                    "keepcost")]

            libc.mallinfo2.restype = MallInfo2
            self._in_use = lambda: (lambda m: m.uordblks + m.hblkhd)(libc.mallinfo2())
        except (OSError, AttributeError):
            self._in_use = None

    def __enter__(self):
        import threading

        if self._in_use is None:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = _status_bytes("VmRSS")
            return self
        self.base = self.peak = self._in_use()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        assert self._stop is not None and self._in_use is not None  # the thread runs only when both are set
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._in_use())

    def __exit__(self, *exc):
        if self._stop is None:
            self.peak = _status_bytes("VmHWM")
        else:
            assert self._in_use is not None  # a sampling thread (self._stop) needs mallinfo2
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._in_use())

    @property
    def extra_mib(self) -> float:
        return max(self.peak - self.base, 0) / 2**20


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(f.read().split(key + ":")[1].split()[0]) * 1024


REFERENCE = {"clip": "open_clip ClipLoss", "siglip": "open_clip SigLipLoss", "symile": "symile.Symile('n')"}
TILE = 1024  # pipeline.losses.tiles.default_chunk on CPU
CHECK_MAX_BATCH = 8192  # float64 re-evaluation for the precision columns stays affordable up to here


def reference_fits(batch: int, n_mod: int) -> bool:
    """The references hold a few B×B fp32 matrices (logits, softmax, their grads): keep 25% headroom."""
    need = 5 * batch * batch * 4 * (n_mod - 1)
    return need < 0.75 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def measure(kind: str, impl: str, dtype: str, batch: int, dim: int, check: bool, threads: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, kind, impl, dtype, str(batch), str(dim), str(int(check)),
                           str(threads)],
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cells(dtype: str) -> list[tuple[str, str, str]]:
    """(column key, implementation, dtype) measured per batch."""
    if dtype == "fp32":
        return [("mmclip", "mmclip", "fp32"), ("reference", "reference", "fp32")]
    return [("mmclip", "mmclip", "bf16"), ("mmclip_fp32", "mmclip", "fp32"), ("reference", "reference", "bf16")]


def paired_ratio(slow: dict, fast: dict) -> float:
    """Median over rounds of slow/fast: each round's two runs ran back to back, so load spells cancel."""
    return statistics.median(x / y for x, y in zip(slow["runs"], fast["runs"]))


def median_of(runs: list[dict]) -> dict:
    ok = [r for r in runs if "seconds" in r]
    if not ok:
        return runs[0]
    merged = {key: statistics.median(r[key] for r in ok) for key in ("seconds", "extra_mib")}
    merged.update({k: v for k, v in ok[0].items() if k not in merged})  # precision: measured in round 1
    merged["runs"] = [r["seconds"] for r in ok]
    return merged


def run_loss_bench(kind: str, batches: list[int], dim: int, out_dir: str, dtype: str = "fp32",
                   repeats: int = 3, threads: int = 0) -> list[dict]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_mod = 3 if kind == "symile" else 2
    rates = {d: gemm_flops(dim, d, threads, TILE) for d in sorted({"fp32", dtype})}
    rows = []
    for batch in batches:
        runs = {key: [] for key, _, _ in cells(dtype)}
        for round_ in range(repeats):  # interleaved, so a slow spell on the shared machine hits every cell
            for key, impl, cell_dtype in cells(dtype):
                if impl == "reference" and not reference_fits(batch, n_mod):
                    runs[key] = [{"skipped": "does not fit in RAM"}]
                    continue
                check = round_ == 0 and cell_dtype == "bf16" and batch <= CHECK_MAX_BATCH
                runs[key].append(measure(kind, impl, cell_dtype, batch, dim, check, threads))
        sweeps = n_mod if kind == "symile" else 1  # Symile: one B×B sweep per anchor modality
        row = {"batch": batch, "dim": dim, **{key: median_of(r) for key, r in runs.items()},
               "gemm_limit_seconds": 4 * 2 * batch * batch * dim * sweeps / rates[dtype]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {"kind": kind, "dtype": dtype, "reference": REFERENCE[kind], "cpus": os.cpu_count(), "threads": threads,
              "repeats": repeats, "gemm_gflops": {d: r / 1e9 for d, r in rates.items()}, "rows": rows}
    stem = f"loss_{kind}" + ("" if dtype == "fp32" else f"_{dtype}")
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (out / f"{stem}.md").write_text(markdown(report))
    plot(report, out / f"{stem}.png")
    print(markdown(report))
    return rows


def _cell(r: dict, key: str, fmt: str) -> str:
    if "skipped" in r:
        return "skipped (" + r["skipped"] + ")"
    if "error" in r:
        return "failed: " + r["error"][:40]
    return format(r[key], fmt) if key in r else "-"


def _limit(row: dict, key: str = "mmclip") -> str:
    return f"{row[key]['seconds'] / row['gemm_limit_seconds']:.2f}×" if "seconds" in row[key] else "-"


def markdown(report: dict) -> str:
    rates = report["gemm_gflops"]
    threads = f"{report['threads']} torch thread(s)" if report.get("threads") else "torch's default threads"
    head = (f"`{report['kind']}` loss, forward+backward, D={report['rows'][0]['dim']}, {report['cpus']} CPU cores, {threads}, "
            f"median of {report['repeats']} interleaved runs; measured GEMM rate at the {TILE}-row tile: "
            + ", ".join(f"{d} {r:.0f} GFLOP/s" for d, r in rates.items()) + ".")
    if report["dtype"] == "fp32":
        lines = [head, "", f"| B | mmclip s | {report['reference']} s | mmclip extra MiB | reference extra MiB | "
                 "mmclip / GEMM limit |", "|---|---|---|---|---|---|"]
        for row in report["rows"]:
            ours, ref = row["mmclip"], row["reference"]
            lines.append(f"| {row['batch']:,} | {_cell(ours, 'seconds', '.2f')} | {_cell(ref, 'seconds', '.2f')} | "
                         f"{_cell(ours, 'extra_mib', '.0f')} | {_cell(ref, 'extra_mib', '.0f')} | {_limit(row)} |")
        return "\n".join(lines) + "\n"
    ref = f"{report['reference']} (amp bf16)"
    lines = [head + " fp32 / bf16: median over rounds of the paired ratio.", "",
             f"| B | mmclip bf16 s | mmclip fp32 s | fp32 / bf16 | {ref} s | bf16 extra MiB | "
             "fp32 extra MiB | reference extra MiB | bf16 / bf16 GEMM limit |", "|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        low, full, amp = row["mmclip"], row["mmclip_fp32"], row["reference"]
        speedup = f"{paired_ratio(full, low):.2f}×" if "runs" in low and "runs" in full else "-"
        lines.append(f"| {row['batch']:,} | {_cell(low, 'seconds', '.2f')} | {_cell(full, 'seconds', '.2f')} | "
                     f"{speedup} | {_cell(amp, 'seconds', '.2f')} | {_cell(low, 'extra_mib', '.0f')} | "
                     f"{_cell(full, 'extra_mib', '.0f')} | {_cell(amp, 'extra_mib', '.0f')} | {_limit(row)} |")
    lines += ["", "Against float64 of the same bf16 inputs (loss relative error; lowest feature-gradient cosine; "
              "largest gradient error / largest float64 gradient entry):", "",
              "| B | implementation | loss rel. error | gradient cosine | max rel. gradient error |", "|---|---|---|---|---|"]
    for row in report["rows"]:
        for key, label in (("mmclip", "mmclip bf16"), ("reference", ref)):
            r = row[key]
            if "loss_rel_err" in r:
                lines.append(f"| {row['batch']:,} | {label} | {r['loss_rel_err']:.1e} | {r['grad_cosine']:.6f} | "
                             f"{r['grad_max_rel_err']:.1e} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"mmclip": "mmclip (tiled)", "reference": report["reference"]}
    if report["dtype"] != "fp32":
        labels = {"mmclip": "mmclip bf16 (tiled)", "mmclip_fp32": "mmclip fp32 (tiled)",
                  "reference": report["reference"] + " amp bf16"}
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for key, label in labels.items():
        pts = [(r["batch"], r[key]) for r in report["rows"] if "seconds" in r[key]]
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
    fig.suptitle(f"{report['kind']} loss, {report['dtype']}, D={report['rows'][0]['dim']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
