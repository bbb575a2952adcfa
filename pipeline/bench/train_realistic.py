"""`mmclip bench train --realistic`: mmclip vs open_clip_train at the ViT-Ti/16 size on photo-like JPEGs.

Variants, each a fresh process, `repeats` rounds interleaved so machine noise hits all alike: mmclip eager and
with `train.compile` model / step; open_clip_train with and without `--torchcompile`; fp32 and bf16. Per
variant: steady-state samples/s and peak RSS (medians over rounds); where the step's time goes (mmclip's
`train.phase_times`; open_clip_train's own data and batch times); and model FLOP utilisation (MFU): the
towers' training FLOPs per sample, counted by torch's FlopCounterMode, times samples/s over the GEMM rate
measured here in the run's dtype. Apart from the runs, the optimizer-side costs each change removes are
timed alone on the model's own parameters: DeepSpeed's per-parameter clip loop vs torch's foreach clip, and
AdamW's per-tensor loop vs foreach vs fused.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.bench.machine import cpu_model, gemm_flops
from pipeline.bench.train import (
    ROOT,
    open_clip_cmd,
    open_clip_model_config,
    open_clip_rate_and_split,
    ours_cmd,
    ours_rate,
    pyplot,
    throughput,
)
from pipeline.config import RunConfig, load_config
from pipeline.train.phases import PHASES

SPLIT = (*PHASES, "other")


@dataclass(frozen=True)
class Variant:
    name: str
    trainer: str  # "mmclip" | "open_clip_train"
    compile: str  # mmclip: train.compile; open_clip_train: "none" or "model" (--torchcompile)

    @property
    def label(self) -> str:
        if self.trainer == "mmclip":
            return "mmclip" + ("" if self.compile == "none" else f", compile {self.compile}")
        return "open_clip_train" + (" --torchcompile" if self.compile == "model" else "")


VARIANTS = {v.name: v for v in (
    Variant("mmclip", "mmclip", "none"), Variant("mmclip_model", "mmclip", "model"),
    Variant("mmclip_step", "mmclip", "step"), Variant("open_clip_train", "open_clip_train", "none"),
    Variant("open_clip_train_compile", "open_clip_train", "model"))}


def mmclip_split(out: Path, skip: int) -> dict[str, float]:
    """Mean milliseconds per phase over the steady-state steps of one run (train.phase_times)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/forward_ms" in r][skip:]
    return {p: statistics.mean(r[f"time/{p}_ms"] for r in rows) for p in SPLIT}


def training_flops_per_sample(cfg: RunConfig, batch: int = 2) -> float:
    """FLOPs of one training sample through the towers (forward + backward), as FlopCounterMode counts them,
    with the CPU attention kernel counted as torch counts the CUDA ones (it has no formula for it)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    from pipeline.modalities.image import ImagePreprocess
    from pipeline.modalities.text import TextPreprocess
    from pipeline.models import build_model

    model = build_model(cfg.model)
    inputs = {}
    for modality, spec in model.inputs().items():
        if isinstance(spec, ImagePreprocess):
            inputs[modality] = torch.randint(0, 256, (batch, 3, spec.image_size, spec.image_size), dtype=torch.uint8)
        elif isinstance(spec, TextPreprocess):
            inputs[modality] = torch.randint(1, 49000, (batch, spec.context_length))
        else:
            raise ValueError(f"the realistic train bench counts image and text towers, not {modality!r}")
    aten = torch.ops.aten
    attention = {aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *_, **__: sdpa_flop_count(q, k, v),
                 aten._scaled_dot_product_flash_attention_for_cpu_backward:
                     lambda g, q, k, v, *_, **__: sdpa_backward_flop_count(g, q, k, v)}
    with FlopCounterMode(display=False, custom_mapping=attention) as counter:
        features = model(inputs)
        torch.stack([features[m].sum() for m in inputs]).sum().backward()
    return counter.get_total_flops() / batch


OPTIMIZER_PROBE = r"""
import json, os, statistics, sys, time, torch
import deepspeed
from deepspeed.runtime.utils import clip_grad_norm_ as deepspeed_clip
from pipeline.config import load_config
from pipeline.models import build_model
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
deepspeed.init_distributed(dist_backend="gloo", verbose=False)  # DeepSpeed's clip averages its norm over ranks
params = [p for p in build_model(load_config(sys.argv[1]).model).parameters() if p.requires_grad]
for p in params:
    p.grad = torch.randn_like(p)
def ms(fn, repeats=15):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)
out = {"tensors": len(params), "parameters": sum(p.numel() for p in params),
       "clip_deepspeed_ms": ms(lambda: deepspeed_clip(params, 1e9)),
       "clip_foreach_ms": ms(lambda: torch.nn.utils.clip_grad_norm_(params, 1e9, foreach=True))}
for name, kw in (("for_loop", dict(foreach=False)), ("foreach", dict(foreach=True)), ("fused", dict(fused=True))):
    opt = torch.optim.AdamW(params, lr=1e-9, **kw)
    out[f"adamw_{name}_ms"] = ms(opt.step)
print(json.dumps(out))
"""


def optimizer_costs(config: str) -> dict:
    """Milliseconds per step of the optimizer-side work on the model's parameters, each option alone."""
    port = str(29500 + os.getpid() % 1000)
    proc = subprocess.run([sys.executable, "-c", OPTIMIZER_PROBE, config, port], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode:
        raise RuntimeError("optimizer probe failed:\n" + proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_realistic_train_bench(config: str = "configs/bench_realistic.yaml", batch: int = 32, steps: int = 8,
                              workers: int = 1, out_dir: str = "docs/bench", repeats: int = 5,
                              variants: tuple[str, ...] = tuple(VARIANTS),
                              precisions: tuple[str, ...] = ("fp32", "bf16")) -> dict:
    cfg = load_config(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    skip = max(2, steps // 4)
    results: dict = {"config": config, "batch": batch, "steps": steps, "skip": skip, "workers": workers,
                     "cpus": os.cpu_count(), "machine": cpu_model(), "repeats": repeats,
                     "gemm_gflops": {p: gemm_flops(1024, p) / 1e9 for p in precisions},
                     "train_gflops_per_sample": training_flops_per_sample(cfg) / 1e9,
                     "optimizer": optimizer_costs(config), "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_json = tmp / "mmclip_bench_model.json"
        model_json.write_text(json.dumps(open_clip_model_config(cfg)))

        def command(v: Variant, d: Path, precision: str) -> list[str]:
            if v.trainer == "mmclip":
                return ours_cmd(config, d, batch, steps, None, workers, precision,
                                {"train.compile": v.compile, "train.phase_times": "true"})
            return open_clip_cmd(cfg, model_json, d, batch, steps, workers, precision,
                                 torchcompile=v.compile == "model")

        def measure(v: Variant, d: Path) -> Callable[[str], tuple[float, dict]]:
            if v.trainer == "mmclip":
                return lambda log: (ours_rate(d, skip), mmclip_split(d, skip))
            return lambda log: open_clip_rate_and_split(log, skip)

        keys = [(VARIANTS[name], p) for p in precisions for name in variants]
        runs: dict = {key: [] for key in keys}
        for i in range(repeats):  # interleaved, so machine noise hits every variant alike
            for v, precision in keys:
                run_dir = tmp / f"{v.name}-{precision}-{i}"
                (speed, split), rss = throughput(command(v, run_dir, precision), None, measure(v, run_dir))
                runs[(v, precision)].append((speed, rss, split))
                print(f"run {i}: {v.label} {precision} {speed:.2f} samples/s, peak RSS {rss} MiB", flush=True)
        for (v, precision), values in runs.items():
            speeds = [s for s, _, _ in values]
            split = {k: statistics.median(x[k] for _, _, x in values) for k in values[0][2]}
            results["rows"].append({
                "variant": v.name, "label": v.label, "trainer": v.trainer, "precision": precision,
                "samples_per_s": statistics.median(speeds), "runs": [round(s, 2) for s in speeds],
                "peak_rss_mib": statistics.median(m for _, m, _ in values), "rss_runs": [m for _, m, _ in values],
                "split_ms": split, "mfu": mfu(results, precision, statistics.median(speeds))})
    write_realistic_report(results, out)
    return results


def mfu(r: dict, precision: str, samples_per_s: float) -> float:
    return r["train_gflops_per_sample"] * samples_per_s / r["gemm_gflops"][precision]


def lead(r: dict, precision: str) -> tuple[dict, dict] | None:
    """(mmclip's fastest row, open_clip_train's fastest row) at `precision`, when both ran."""
    rows = [x for x in r["rows"] if x["precision"] == precision]
    ours = [x for x in rows if x["trainer"] == "mmclip"]
    theirs = [x for x in rows if x["trainer"] == "open_clip_train"]
    if not ours or not theirs:
        return None
    return max(ours, key=lambda x: x["samples_per_s"]), max(theirs, key=lambda x: x["samples_per_s"])


def _split_cell(split: dict) -> str:
    if "forward" in split:
        return " / ".join(f"{split[p]:.0f}" for p in SPLIT)
    return f"{split['data']:.0f} data, {split['compute']:.0f} rest"


def write_realistic_report(r: dict, out: Path) -> None:
    (out / "train_realistic.json").write_text(json.dumps(r, indent=2))
    rates = ", ".join(f"{p} {g:.0f}" for p, g in r["gemm_gflops"].items())
    lines = [f"ViT-Ti/16-shaped image tower + 6-layer text transformer (`{r['config']}`) on the realistic JPEGs "
             f"(224-px crops), global batch {r['batch']}, {r['steps']} steps (first {r['skip']} dropped), "
             f"{r['workers']} data worker(s); {r['machine']}, {r['cpus']} cores; median of {r['repeats']} "
             f"interleaved runs per row (all runs in brackets). Training FLOPs per sample (forward + backward, "
             f"FlopCounterMode): {r['train_gflops_per_sample']:.2f} GFLOP; measured GEMM rate (1024^3): {rates} "
             f"GFLOP/s, the MFU denominator.", "",
             "| precision | trainer | samples/s | ÷ best open_clip_train | peak RSS (MiB) | step ms: data / forward / "
             "loss / backward / optimizer / other | MFU |", "|---|---|---|---|---|---|---|"]
    for p in dict.fromkeys(x["precision"] for x in r["rows"]):
        best = lead(r, p)
        for x in (x for x in r["rows"] if x["precision"] == p):
            ratio = f"{x['samples_per_s'] / best[1]['samples_per_s']:.2f}x" if best else "-"
            lines.append(f"| {p} | {x['label']} | {x['samples_per_s']:.1f} {x['runs']} | {ratio} | "
                         f"{x['peak_rss_mib']:.0f} | {_split_cell(x['split_ms'])} | {100 * x['mfu']:.0f}% |")
    o = r["optimizer"]
    lines += ["", "bf16: mmclip is DeepSpeed bf16 (ZeRO-1, fp32 master weights); open_clip_train is "
              "`--precision amp_bf16` (autocast, fp32 weights). open_clip_train's log splits a step into its data "
              "wait and the rest.", "",
              f"Optimizer-side work per step on the model's {o['tensors']} parameter tensors "
              f"({o['parameters'] / 1e6:.1f} M values), each option timed alone (median of 15): gradient clipping "
              f"DeepSpeed's per-parameter loop (its ZeRO-0 path) {o['clip_deepspeed_ms']:.1f} ms vs torch's "
              f"foreach clip_grad_norm_ (mmclip at ZeRO 0) {o['clip_foreach_ms']:.1f} ms; AdamW per-tensor loop "
              f"{o['adamw_for_loop_ms']:.1f} ms, foreach {o['adamw_foreach_ms']:.1f} ms, fused (mmclip) "
              f"{o['adamw_fused_ms']:.1f} ms."]
    (out / "train_realistic.md").write_text("\n".join(lines) + "\n")
    plot_realistic(r, out / "train_realistic.png")
    print("\n".join(lines))


def plot_realistic(r: dict, path: Path) -> None:
    """Samples/s of every run per variant (bars: medians) and peak RSS, fp32 and bf16 side by side."""
    plt = pyplot()
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(12, 5))
    for x, row in enumerate(r["rows"]):
        colour = "C0" if row["trainer"] == "mmclip" else "C1"
        shade = 1.0 if row["precision"] == "fp32" else 0.55
        speed.bar(x, row["samples_per_s"], color=colour, alpha=shade)
        speed.plot([x] * len(row["runs"]), row["runs"], "k.", ms=5)
        memory.bar(x, row["peak_rss_mib"], color=colour, alpha=shade)
    labels = [f"{row['label'].replace('mmclip, ', 'mmclip ')} {row['precision']}" for row in r["rows"]]
    for ax, ylabel in ((speed, f"training samples/s (batch {r['batch']})"), (memory, "peak RSS (MiB)")):
        ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=35, ha="right")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
