"""`mmclip bench quality`: what a loss option buys in zero-shot quality, on the demo, averaged over seeds.

Each arm trains configs/demo.yaml with some overrides (fresh subprocess, same data, same number of
samples seen) and is scored by the demo's final eval (zero-shot classification and retrieval).
Studies:
- small_batch: InfoNCE at global batch 32, the global contrastive loss (global_clip) at batch 32, and
  InfoNCE at batch 128 (a quarter of the steps), the large-batch reference;
- mined: InfoNCE with and without mined + mixed hard negatives, at the demo's batch.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from pipeline.bench.train import ROOT, subprocess_env

SMALL = {"data.batch_size": 32, "optim.total_steps": 1200, "optim.warmup_steps": 80, "train.checkpoint_every": 1200,
         "train.log_every": 100}
STUDIES = {
    "small_batch": {
        "InfoNCE, batch 32": {**SMALL, "loss": "{kind: clip}"},
        "global_clip, batch 32": {**SMALL, "loss": "{kind: global_clip, gamma: 0.2, gamma_schedule: cosine, "
                                                   "gamma_decay_steps: 1200}"},
        "InfoNCE, batch 128": {"loss": "{kind: clip}"},
    },
    "mined": {
        "InfoNCE": {"loss": "{kind: clip}"},
        "InfoNCE + mined negatives": {"loss": "{kind: clip, mined_negatives: {top_k: 16, mixed: 8, "
                                              "mix_with_anchor: 4, start_step: 50}}"},
    },
}
METRICS = ("fashion_mnist/acc1", "fashion_mnist_retrieval/image_retrieval_recall@1",
           "fashion_mnist_retrieval/text_retrieval_recall@1")


def train_and_score(overrides: dict, seed: int, out: Path) -> dict:
    sets = [f"{k}={v}" for k, v in {"output_dir": out, "train.seed": seed, **overrides}.items()]
    cmd = [sys.executable, "-m", "pipeline", "train", "configs/demo.yaml", *sum((["--set", s] for s in sets), [])]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"training failed: {proc.stderr.strip().splitlines()[-1]}")
    final = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    return {m: final[m] for m in METRICS}


def run_quality_bench(study: str, seeds: list[int], out_dir: str) -> dict:
    arms = STUDIES[study]
    runs = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:  # interleaved: every arm once per seed
            for i, (arm, overrides) in enumerate(arms.items()):
                runs[arm].append(train_and_score(overrides, seed, Path(tmp) / f"{seed}_{i}"))
                print(json.dumps({"arm": arm, "seed": seed, **runs[arm][-1]}), flush=True)
    report = {"study": study, "seeds": seeds, "arms": {
        arm: {m: {"mean": statistics.mean(r[m] for r in rs), "runs": [r[m] for r in rs]} for m in METRICS}
        for arm, rs in runs.items()}}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"quality_{study}.json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    (out / f"quality_{study}.md").write_text(table)
    print(table)
    return report


def markdown(r: dict) -> str:
    lines = [f"`{r['study']}` on the demo (configs/demo.yaml), mean of seeds {r['seeds']}; the same samples seen by "
             "every arm.", "", "| arm | zero-shot acc1 | image R@1 | text R@1 |", "|---|---|---|---|"]
    for arm, m in r["arms"].items():
        lines.append(f"| {arm} | " + " | ".join(f"{m[k]['mean']:.3f}" for k in METRICS) + " |")
    return "\n".join(lines) + "\n"
