"""The quality studies' judge: CLIP_benchmark, run on an open_clip `local-dir:` folder, whoever trained it.

Both trainers' models are scored by the same code path: an mmclip run is exported (`mmclip export`), an
open_clip_train checkpoint is written into the same folder layout (its weights, the same model and
preprocess config), and `clip_benchmark eval --model local-dir:DIR` scores each set. The compositional
probe, which CLIP_benchmark has no task for, is scored by `mmclip eval --task compositional_probe` on the
same folder.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline.bench.train import ROOT, subprocess_env
from pipeline.config import RunConfig

# One process scores every set of a model: CLIP_benchmark's CLI reads sys.argv, so each set is one call.
CLIP_BENCHMARK = """
import json, sys
from clip_benchmark.cli import main
for argv in json.loads(sys.argv[1]):
    sys.argv = ["clip_benchmark", *argv]
    main()
"""


@dataclass(frozen=True)
class EvalSet:
    """A CLIP_benchmark wds set (`root`/test/*.tar), scored under `name`."""

    name: str
    task: str  # zeroshot_classification | zeroshot_retrieval
    root: Path


def clip_benchmark_scores(model_dir: Path, sets: list[EvalSet], work: Path) -> dict[str, float]:
    """{"<set>/<CLIP_benchmark metric>": value} for an open_clip local-dir folder."""
    calls, outputs = [], {}
    for s in sets:
        outputs[s.name] = work / f"clip_benchmark_{s.name}.json"
        calls.append(["eval", "--model", f"local-dir:{model_dir}", "--dataset", f"wds/{s.root.name}",
                      "--dataset_root", str(s.root), "--task", s.task, "--no_amp", "--num_workers", "0",
                      "--batch_size", "256", "--recall_k", "1", "5", "10", "--quiet", "--output",
                      str(outputs[s.name])])
    _run([sys.executable, "-c", CLIP_BENCHMARK, json.dumps(calls)], "clip_benchmark eval")
    return {f"{name}/{k}": float(v) for name, path in outputs.items()
            for k, v in json.loads(path.read_text())["metrics"].items()}


def probe_scores(model_dir: Path, probe: Path, work: Path) -> dict[str, float]:
    out = work / "probe.json"
    _run([sys.executable, "-m", "pipeline", "eval", "--checkpoint", f"local-dir:{model_dir}", "--task",
          "compositional_probe", "--dataset", str(probe), "--output", str(out)], "mmclip eval (probe)")
    return {f"probe/{k}": float(v) for k, v in json.loads(out.read_text())["metrics"].items()
            if k.startswith("probe_acc")}


def open_clip_train_dir(checkpoint: Path, cfg: RunConfig, out: Path) -> Path:
    """An open_clip_train checkpoint as a local-dir folder, with the config an mmclip export of `cfg` writes
    (same architecture, same eval preprocessing), so both trainers' models are read the same way."""
    from pipeline.export.open_clip import CONFIG, WEIGHTS, open_clip_config
    from pipeline.models import build_model

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    out.mkdir(parents=True, exist_ok=True)
    save_file({k.removeprefix("module."): v.contiguous() for k, v in state.items()}, str(out / WEIGHTS))
    (out / CONFIG).write_text(json.dumps(open_clip_config(build_model(cfg.model), cfg.model), indent=2))
    return out


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{what} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
