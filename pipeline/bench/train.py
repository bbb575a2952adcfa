"""`mmclip bench train`: our trainer vs open_clip's (`open_clip_train`) on the same model, data and batch.

Two measurements, each run as fresh subprocesses so neither trainer warms the other's caches:
1. throughput: steady-state training samples/s (first log windows dropped as warm-up), the median of
   `repeats` runs of each trainer, interleaved so machine noise hits both alike; each trainer both with
   torch's default thread pool and with one that leaves the data workers their cores;
2. the largest global batch that trains (a few steps) under a resident-memory cap, doubling B.
open_clip gets the identical architecture: our towers are open_clip towers, so their configs
are written as an open_clip model config and registered before its trainer starts.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, TypeVar

from pipeline.config import RunConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")
OPEN_CLIP_WRAPPER = """
import sys, open_clip
open_clip.add_model_config(sys.argv[1])
from open_clip_train.main import main
main(sys.argv[2:])
"""


def subprocess_env(extra: dict | None = None) -> dict:
    return {**os.environ, "MMCLIP_NO_PROGRESS": "1", "PYTHONUNBUFFERED": "1", **(extra or {})}


MEASURE = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[1:]).returncode
print("MMCLIP_MAXRSS_KIB", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True)
sys.exit(code)
"""


def _run_measured(cmd: list[str], cwd: Path, env: dict | None = None) -> tuple[int, str]:
    """Run a command; return (peak RSS of its largest process in MiB, or -1 if it failed; its output)."""
    proc = subprocess.run([sys.executable, "-c", MEASURE, *cmd], cwd=cwd, env=subprocess_env(env), capture_output=True,
                          text=True)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        return -1, output
    match = re.search(r"MMCLIP_MAXRSS_KIB (\d+)", output)
    assert match is not None, output  # MEASURE prints it when the command succeeded
    return int(match.group(1)) // 1024, output


def open_clip_model_config(cfg: RunConfig) -> dict:
    """Our image/text towers expressed as an open_clip model config (they are open_clip towers)."""
    from pipeline.models import build_model

    model = build_model(cfg.model)
    towers = model.towers
    return {"embed_dim": cfg.model.embed_dim, "vision_cfg": towers["image"].export_cfg,
            "text_cfg": towers["text"].export_cfg}


def ours_cmd(config: str, out: Path, batch: int, steps: int, micro_batch: int | None, workers: int,
             precision: str = "fp32", extra: dict | None = None) -> list[str]:
    """`mmclip train` on `config` for a speed run; `extra` adds --set overrides (e.g. train.compile)."""
    # DeepSpeed's bf16 needs ZeRO >= 1 (pipeline.config); on one rank stage 1 partitions nothing.
    sets = {"output_dir": out, "data.batch_size": batch, "optim.total_steps": steps, "optim.warmup_steps": 0,
            "train.log_every": 1, "train.checkpoint_every": 10**6, "eval.tasks": "[]", "data.workers": workers,
            "train.micro_batch": micro_batch if micro_batch else "null", "deepspeed.precision": precision,
            "deepspeed.zero_stage": 1 if precision == "bf16" else 0, **(extra or {})}
    args = [sys.executable, "-m", "pipeline", "train", config]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    return args


def open_clip_cmd(cfg: RunConfig, model_json: Path, logs: Path, batch: int, steps: int, workers: int,
                  precision: str = "fp32", *, seed: int = 0, warmup: int = 0, save: bool = False,
                  torchcompile: bool = False) -> list[str]:
    """open_clip_train on our model and shards with the run's optimiser settings and normalisation;
    `precision` bf16 is its `amp_bf16` (autocast); `save` keeps its final checkpoint (epoch_1.pt);
    `torchcompile` is its --torchcompile (torch.compile of the whole model)."""
    o, image = cfg.optim, cfg.model.towers["image"].options
    args = [sys.executable, "-c", OPEN_CLIP_WRAPPER, str(model_json),
            "--model", model_json.stem, "--train-data", cfg.data.train.split("::")[0],
            "--dataset-type", "webdataset", "--dataset-resampled", "--train-num-samples", str(batch * steps),
            "--batch-size", str(batch), "--epochs", "1", "--workers", str(workers),
            "--precision", "amp_bf16" if precision == "bf16" else "fp32",
            "--lr", str(o.lr), "--wd", str(o.weight_decay), "--warmup", str(warmup),
            "--beta1", str(o.betas[0]), "--beta2", str(o.betas[1]), "--eps", str(o.eps),
            "--log-every-n-steps", "1", "--logs", str(logs), "--name", f"b{batch}-{time.time_ns()}",
            "--save-frequency", "1" if save else "0", "--report-to", "", "--seed", str(seed), "--device", "cpu"]
    for flag, key in (("--image-mean", "mean"), ("--image-std", "std")):
        if key in image:
            args += [flag, *(str(x) for x in image[key])]
    return args + (["--grad-clip-norm", str(o.grad_clip)] if o.grad_clip else []) + \
        (["--torchcompile"] if torchcompile else [])


def ours_rate(out: Path, skip: int) -> float:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in rows if "samples_per_s" in r][skip:]
    return sum(rates) / len(rates)


def open_clip_rate_and_split(output: str, skip: int) -> tuple[float, dict[str, float]]:
    """open_clip_train's samples/s and its split (data wait, the rest of the step) from its per-step log lines."""
    lines = re.findall(r"Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+), ([\d.e+]+)/s,", output)[skip:]
    if not lines:
        raise RuntimeError("open_clip_train printed no throughput lines:\n" + output[-2000:])
    data, batch, rate = (statistics.mean(float(x[i]) for x in lines) for i in range(3))
    return rate, {"data": 1000 * data, "compute": 1000 * (batch - data)}


def run_train_bench(config: str = "configs/demo.yaml", batch: int = 128, steps: int = 30, workers: int = 1,
                    micro_batch: int = 64, mem_cap_mib: int = 3072, max_batch: int = 65536,
                    out_dir: str = "docs/bench", repeats: int = 3) -> dict:
    cfg = load_config(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"config": config, "batch": batch, "steps": steps, "workers": workers, "cpus": os.cpu_count(),
                     "mem_cap_mib": mem_cap_mib, "micro_batch": micro_batch}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_json = tmp / "mmclip_bench_model.json"
        model_json.write_text(json.dumps(open_clip_model_config(cfg)))
        skip = max(2, steps // 5)

        # Each trainer twice: with torch's default threads (every core), and with OMP_NUM_THREADS = cores -
        # workers, which leaves the loader its core. Which is faster depends on the workload, not the trainer.
        threads = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) - workers))}
        variants = {}
        for suffix, env in (("", None), ("_threads", threads)):
            variants["ours" + suffix] = (lambda d: ours_cmd(config, d, batch, steps, None, workers), env,
                                         lambda d, log: ours_rate(d, skip))
            variants["open_clip" + suffix] = (lambda d: open_clip_cmd(cfg, model_json, d, batch, steps, workers),
                                              env, lambda d, log: open_clip_rate_and_split(log, skip)[0])
        runs = {name: [] for name in variants}
        for i in range(repeats):  # interleaved, so machine noise hits every variant alike
            for name, (make_cmd, env, rate) in variants.items():
                run_dir = tmp / f"{name}{i}"
                runs[name].append(throughput(make_cmd(run_dir), env, lambda log, d=run_dir, r=rate: r(d, log))[0])
        for name, values in runs.items():
            results[f"{name}_samples_per_s"], results[f"{name}_runs"] = statistics.median(values), values
        results["threads_env"] = threads

        results["ours_max_batch"], results["ours_rss"] = _largest_batch(
            lambda b, i: ours_cmd(config, tmp / f"ours_mem{i}", b, 2, micro_batch, 0), mem_cap_mib, max_batch)
        results["open_clip_max_batch"], results["open_clip_rss"] = _largest_batch(
            lambda b, i: open_clip_cmd(cfg, model_json, tmp / f"oc_mem{i}", b, 2, 0), mem_cap_mib, max_batch)
    write_report(results, out)
    return results


def throughput(cmd: list[str], env: dict | None, rate: Callable[[str], T]) -> tuple[T, int]:
    """(what `rate` reads from the run's output: samples/s, or samples/s and more; peak RSS in MiB) of one run."""
    rss, log = _run_measured(cmd, ROOT, env)
    if rss < 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} failed:\n" + log[-2000:])
    return rate(log), rss


def _largest_batch(make_cmd, cap_mib: int, max_batch: int) -> tuple[int, dict]:
    """Double the global batch until a 2-step run fails or exceeds the resident-memory cap."""
    best, seen, b = 0, {}, 256
    while b <= max_batch:
        rss, _ = _run_measured(make_cmd(b, b), ROOT)
        seen[b] = rss
        if rss < 0 or rss > cap_mib:
            break
        best, b = b, b * 2
    return best, seen


LABELS = {"ours": "mmclip", "open_clip": "open_clip_train", "ours_threads": "mmclip, loader's core left",
          "open_clip_threads": "open_clip_train, loader's core left"}


def write_report(r: dict, out: Path) -> None:
    (out / "train.json").write_text(json.dumps(r, indent=2))
    runs = "; ".join(f"{LABELS[k]} {[round(x) for x in r[f'{k}_runs']]}" for k in LABELS)
    env = " ".join(f"{k}={v}" for k, v in r["threads_env"].items())
    lines = [
        f"Demo model (`{r['config']}`), {r['cpus']} CPU cores, fp32, global batch {r['batch']}, "
        f"{r['steps']} steps, {r['workers']} data worker(s); samples/s is the median of "
        f"{len(r['ours_runs'])} interleaved runs each ({runs}).",
        "",
        f"| trainer | samples/s, torch's default threads | samples/s, `{env}` | "
        f"largest batch under {r['mem_cap_mib']} MiB RSS |",
        "|---|---|---|---|",
        f"| mmclip (DeepSpeed, GradCache micro-batch {r['micro_batch']}, tiled loss) | "
        f"{r['ours_samples_per_s']:.0f} | {r['ours_threads_samples_per_s']:.0f} | {r['ours_max_batch']} |",
        f"| open_clip_train | {r['open_clip_samples_per_s']:.0f} | {r['open_clip_threads_samples_per_s']:.0f} | "
        f"{r['open_clip_max_batch']} |",
        "",
        "Peak RSS (MiB) by global batch: mmclip " + json.dumps(r["ours_rss"]) + "; open_clip "
        + json.dumps(r["open_clip_rss"]) + " (-1: the run failed).",
    ]
    (out / "train.md").write_text("\n".join(lines) + "\n")
    plot(r, out / "train.png")
    print("\n".join(lines))


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(r: dict, path: Path) -> None:
    """Left: samples/s of every run; right: peak RSS against global batch, with the memory cap."""
    plt = pyplot()
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4))
    for x, (key, label) in enumerate(LABELS.items()):
        runs = r[f"{key}_runs"]
        speed.bar(x, r[f"{key}_samples_per_s"], color=f"C{x % 2}", alpha=0.6 if x < 2 else 0.35)
        speed.plot([x] * len(runs), runs, "k.", ms=6)
        if f"{key}_rss" in r:
            pts = sorted((int(b), m) for b, m in r[f"{key}_rss"].items() if m > 0)
            memory.plot([b for b, _ in pts], [m for _, m in pts], "o-", color=f"C{x % 2}", label=label)
    threads = f"\n{r['threads_env']['OMP_NUM_THREADS']} thread(s)"
    speed.set_xticks(range(len(LABELS)), [("mmclip" if k.startswith("ours") else "open_clip_train")
                                          + (threads if k.endswith("_threads") else "") for k in LABELS])
    speed.set_ylabel(f"training samples/s (batch {r['batch']})")
    memory.axhline(r["mem_cap_mib"], color="k", ls="--", lw=1, label="memory cap")
    memory.set_xscale("log", base=2)
    memory.set_xlabel("global batch")
    memory.set_ylabel("peak RSS (MiB)")
    memory.legend()
    for ax in (speed, memory):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
