"""`mmclip train` as a test runs it: tiny overrides on the demo shards, the launcher command, metrics."""
import json
import os
import subprocess
import sys
from pathlib import Path

from helpers.paths import ROOT

ENV = {**os.environ, "MMCLIP_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}  # one thread a rank: 2 ranks, 2 cores
MMCLIP = [sys.executable, "-m", "pipeline"]


def tiny_overrides(shards: Path, out: Path, steps: int, **extra) -> list[str]:
    sets = {
        "output_dir": str(out),
        "data.train": str(shards / "demo/train/train-{000000..000005}.tar"),
        "data.batch_size": 32, "data.workers": 1, "data.shuffle_buffer": 64,
        "model.towers.image.options": "{image_size: 28, patch_size: 7, width: 32, layers: 1, head_width: 16}",
        "model.towers.text.options": "{context_length: 16, width: 32, heads: 2, layers: 1}",
        "optim.total_steps": steps, "optim.warmup_steps": 0, "optim.lr": 5e-3,
        "train.log_every": 1, "train.checkpoint_every": 3, "train.keep_checkpoints": 5,
        "eval.tasks": "[]", "deepspeed.zero_stage": 1,  # the suite's default: ZeRO's own checkpoint path
        **extra,
    }
    out_args = []
    for k, v in sets.items():
        out_args += ["--set", f"{k}={v}"]
    return out_args


def train_cmd(nproc: int, overrides: list[str], resume: bool = False, launcher: str = "torchrun",
              config: str = "configs/demo.yaml") -> list[str]:
    port = str(29600 + os.getpid() % 300)
    if nproc == 1:
        prefix = [sys.executable, "-m", "pipeline"]
    elif launcher == "torchrun":
        prefix = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port", port,
                  "-m", "pipeline"]
    else:  # the deepspeed launcher: it passes --local_rank=N to the module, on CPU as on GPUs
        prefix = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(nproc), "--master_port", port,
                  "--module", "pipeline"]
    return prefix + ["train", str(ROOT / config), *overrides] + (["--resume", "latest"] if resume else [])


def run(cmd, timeout=600, env=None):
    proc = subprocess.run(cmd, cwd=ROOT, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


def mmclip(args, timeout=600, **kw):
    return subprocess.run(args if args[0] == sys.executable else MMCLIP + args, cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout, **kw)


def one_line_error(proc) -> str:
    assert proc.returncode not in (0, None), proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("mmclip: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]
