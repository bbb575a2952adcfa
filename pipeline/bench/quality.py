"""`mmclip bench quality --study parity|small_batch|hard_negatives|...`: is a model trained here good, and what
do the loss options beyond InfoNCE buy? Every arm is trained in a fresh subprocess for each seed (arms
interleaved within a seed) and scored by CLIP_benchmark (pipeline/bench/judge.py); tables give mean ± std.

- parity: mmclip vs open_clip_train on the same open_clip towers, shards, batch, steps and optimiser
  settings (lr, weight decay, warmup, betas, eps, grad clip, normalisation), on the study set
  (configs/study.yaml) and on the demo (configs/demo.yaml). The study set's captions are read as open_clip
  reads them only if each has one line, so both trainers get an English-only copy of its train shards.
- small_batch (study set): InfoNCE at global batch 32, the global contrastive loss at 32, and InfoNCE at 512
  computed in GradCache chunks of 32, i.e. in the memory of batch 32 (GradCache's gradient is the whole
  batch's, tests/unit/test_gradcache.py, so this arm is also plain InfoNCE at 512).
- small_batch_epochs: small_batch's first three arms on 4,000 of the training scenes, so
  the same samples are 16 epochs (the global loss keeps per-sample state that is meant to learn over epochs).
- hard_negatives (study set): InfoNCE, + mined and mixed negatives, + the edited-caption negatives the
  study set ships (.neg.txt) weighted by DiHT's HN-NCE β.
- tune_global_clip, tune_hard_negatives: the settings of those arms, chosen on the val split only (the runs'
  last validation metrics and the val probe; no test set is scored).
On the study set every arm sees the same number of samples (SAMPLES); the learning rate follows the
square root of the batch (the config's lr is for its batch of 128). Validation retrieval over steps (the
val split, never the test sets) is plotted per arm.
"""
from __future__ import annotations

import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from pipeline.bench.judge import EvalSet, clip_benchmark_scores, open_clip_train_dir, probe_scores
from pipeline.bench.machine import cpu_model
from pipeline.bench.train import ROOT, open_clip_cmd, open_clip_model_config, subprocess_env
from pipeline.config import RunConfig, load_config
from pipeline.errors import UserError

SAMPLES = 64_000  # per study-set arm: 2.8 epochs of the 22,812 training scenes
STUDY_ROOT = Path("data/shards/study")
VAL_METRIC = "val/image_retrieval_recall@1"


@dataclass(frozen=True)
class Dataset:
    name: str
    config: str
    sets: tuple[EvalSet, ...]
    probe: Path | None = None
    val_probe: Path | None = None  # the tuning studies' compositional score
    parity_train: str | None = None  # the English-only copy both trainers read in the parity study


STUDY = Dataset("study set", "configs/study.yaml",
                (EvalSet("concepts", "zeroshot_classification", STUDY_ROOT / "wds/study_concepts"),
                 EvalSet("retrieval", "zeroshot_retrieval", STUDY_ROOT / "wds/study_retrieval")),
                STUDY_ROOT / "probe", STUDY_ROOT / "val_probe", str(STUDY_ROOT / "parity_en/train-{000000..000011}.tar"))
DEMO = Dataset("demo", "configs/demo.yaml",
               (EvalSet("concepts", "zeroshot_classification", Path("data/shards/demo/wds/fashion_mnist")),
                EvalSet("retrieval", "zeroshot_retrieval", Path("data/shards/demo/wds/fashion_mnist_retrieval"))))


@dataclass(frozen=True)
class Arm:
    label: str
    dataset: Dataset
    overrides: dict = field(default_factory=dict)  # `--set` keys over the dataset's config
    trainer: str = "mmclip"  # or open_clip_train
    batch: int | None = None  # study-set arms: the global batch (steps = SAMPLES / batch)


def _at_batch(batch: int, micro_batch: int | None = None) -> dict:
    steps = SAMPLES // batch
    return {"data.batch_size": batch, "optim.total_steps": steps, "optim.warmup_steps": max(1, steps * 8 // 100),
            "train.checkpoint_every": steps, "train.log_every": max(1, steps // 20), "eval.every_steps": steps // 8,
            "train.micro_batch": micro_batch or "null"}


PARITY = {"eval.tasks": "[]"}  # the judge scores the test sets; parity needs no curve
MINED = "{kind: clip, mined_negatives: {top_k: 16, mixed: 8, mix_with_anchor: 4, start_step: 100}}"
EPOCHS_TRAIN = str(STUDY_ROOT / "train/train-{000000..000001}.tar")  # 4,000 of the 22,812 training scenes
GLOBAL_CLIP = {"gamma": 0.2, "gamma_schedule": "cosine", "gamma_decay_steps": SAMPLES // 32}
VAL_PROBE = ("[{task: zeroshot_retrieval, dataset: data/shards/study/val/val-000000.tar, name: val}, "
             f"{{task: compositional_probe, dataset: {STUDY.val_probe}, name: val_probe}}]")


def _global_clip_arm(label: str, **changes) -> Arm:
    """global_clip at batch 32: GLOBAL_CLIP's settings with `changes` (None drops a key)."""
    options = ", ".join(f"{k}: {v}" for k, v in {**GLOBAL_CLIP, **changes}.items() if v is not None)
    return Arm(label, STUDY, {**_at_batch(32), "loss": f"{{kind: global_clip, {options}}}"}, batch=32)


def _edited_arm(label: str, k: int, beta: float, extra: dict | None = None) -> Arm:
    """k of the study set's edited captions as explicit negatives per image, weighted by HN-NCE's β."""
    return Arm(label, STUDY, {**_at_batch(128), "data.hard_negatives": f"{{modality: text, extension: neg.txt, k: {k}}}",
                              "loss": f"{{kind: clip, hard_negative_beta: {beta}}}", **(extra or {})}, batch=128)


SMALL_BATCH = [
    Arm("InfoNCE, batch 32", STUDY, _at_batch(32), batch=32),
    Arm("InfoNCE, batch 128", STUDY, _at_batch(128), batch=128),
    _global_clip_arm("global_clip, batch 32"),
    Arm("InfoNCE, batch 512 in GradCache chunks of 32", STUDY, _at_batch(512, 32), batch=512)]
STUDIES: dict[str, list[Arm]] = {
    "parity": [Arm("mmclip", STUDY, PARITY), Arm("open_clip_train", STUDY, PARITY, "open_clip_train"),
               Arm("mmclip", DEMO, PARITY), Arm("open_clip_train", DEMO, PARITY, "open_clip_train")],
    "small_batch": SMALL_BATCH,
    # The same samples drawn from 4,000 scenes: 16 epochs, so each sample's u is updated ~16 times. Batch 512
    # (125 steps, the worst arm at 2.8 epochs) is left out.
    "small_batch_epochs": [replace(arm, overrides={**arm.overrides, "data.train": EPOCHS_TRAIN})
                           for arm in SMALL_BATCH[:3]],
    "hard_negatives": [
        Arm("InfoNCE", STUDY, _at_batch(128), batch=128),
        Arm("+ mined and mixed negatives", STUDY, {**_at_batch(128), "loss": MINED}, batch=128),
        _edited_arm("+ 2 edited-caption negatives, HN-NCE β 0.5", 2, 0.5),
        _edited_arm("+ 2 edited-caption negatives, HN-NCE β 2", 2, 2.0),  # the best val probe of tune_hard_negatives
        _edited_arm("+ 4 edited-caption negatives, HN-NCE β 0.5", 4, 0.5)],  # 3-4 edits apply per scene: all
    # Tuning: the settings above, chosen on the val split only (VAL_COLUMNS); no test set is scored.
    "tune_global_clip": [
        Arm("InfoNCE, batch 32", STUDY, _at_batch(32), batch=32),
        _global_clip_arm("global_clip, batch 32: γ 0.2 cosine, ρ 8"),
        _global_clip_arm("global_clip, γ 0.6 constant", gamma=0.6, gamma_schedule="constant", gamma_decay_steps=None),
        _global_clip_arm("global_clip, ρ 4", rho=4), _global_clip_arm("global_clip, ρ 12", rho=12),
        _global_clip_arm("global_clip, temperature_lr 1e-4", temperature_lr=1e-4),
        _global_clip_arm("global_clip, temperature_lr 2e-3", temperature_lr=2e-3)],
    "tune_hard_negatives": [
        Arm("InfoNCE", STUDY, {**_at_batch(128), "eval.tasks": VAL_PROBE}, batch=128),
        *(_edited_arm(f"+ 2 edited-caption negatives, HN-NCE β {beta}", 2, beta, {"eval.tasks": VAL_PROBE})
          for beta in (0.0, 0.5, 1.0, 2.0, 4.0))],
}


def run_quality_bench(study: str, seeds: list[int], out_dir: str, fresh: bool = False) -> dict:
    """Train and score every (arm, seed) the study's report in `out_dir` does not hold yet (all of them with
    `fresh`): a study cut short, or extended by seeds, goes on where it stopped."""
    arms = STUDIES[study]
    for dataset in {a.dataset.name: a.dataset for a in arms}.values():
        _require_data(dataset)
        if study == "parity" and dataset.parity_train:
            english_only_copy(Path(load_config(dataset.config).data.train).parent, Path(dataset.parity_train).parent)
    report = {"study": study, "samples": SAMPLES, "machine": cpu_model(),
              "arms": [(a.label, a.dataset.name) for a in arms], "runs": []}
    if not fresh:
        report["runs"] = kept_runs(Path(out_dir) / f"quality_{study}.json", report)
    commit = git_commit()
    with tempfile.TemporaryDirectory() as tmp:
        for seed, i, arm in pending(arms, seeds, report["runs"]):
            start = time.monotonic()
            scores, curve = train_and_judge(arm, seed, Path(tmp) / f"{seed}-{i}", parity=study == "parity",
                                            judge=not study.startswith("tune_"))
            report["runs"].append({"arm": arm.label, "dataset": arm.dataset.name, "seed": seed, "scores": scores,
                                   "curve": curve, "seconds": round(time.monotonic() - start), "commit": commit})
            print(json.dumps({k: v for k, v in report["runs"][-1].items() if k != "curve"}), flush=True)
            write_report(report, Path(out_dir))  # after every run: a study cut short keeps what it measured
    print(write_report(report, Path(out_dir)))
    return report


def pending(arms: list[Arm], seeds: list[int], runs: list[dict]) -> list[tuple[int, int, Arm]]:
    """(seed, arm index, arm) still to train, seed by seed with the arms interleaved within a seed, so machine
    drift over a long study hits every arm alike."""
    done = {(r["arm"], r["dataset"], r["seed"]) for r in runs}
    return [(seed, i, arm) for seed in seeds for i, arm in enumerate(arms)
            if (arm.label, arm.dataset.name, seed) not in done]


def kept_runs(path: Path, report: dict) -> list[dict]:
    """The runs of the study's arms in an earlier report of the same study, samples and machine (a seed's run
    is deterministic: training it again gives the same model); nothing if there is none or it differs."""
    if not path.exists():
        return []
    old = json.loads(path.read_text())
    if any(old.get(k) != report[k] for k in ("study", "samples", "machine")):
        print(f"{path} is from other samples or another machine: training every run again", flush=True)
        return []
    arms = set(report["arms"])
    runs = [r for r in old["runs"] if (r["arm"], r["dataset"]) in arms]
    print(f"{path}: keeping its {len(runs)} runs of this study's arms (--fresh trains them again)", flush=True)
    return runs


def git_commit() -> str:
    """The commit the runs were trained at (with '+' when the work tree has changes): a report that gathers
    runs over several sessions says which code gave each."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD")
    return (head or "unknown") + ("+" if git("status", "--porcelain", "--untracked-files=no") else "")


def write_report(report: dict, out: Path) -> str:
    report["seeds"] = sorted({r["seed"] for r in report["runs"]})
    out.mkdir(parents=True, exist_ok=True)
    (out / f"quality_{report['study']}.json").write_text(json.dumps(report, indent=1))
    table = markdown(report)
    (out / f"quality_{report['study']}.md").write_text(table)
    if report["study"] != "parity":
        plot_curves(report, out / f"quality_{report['study']}.png")
    return table


def train_and_judge(arm: Arm, seed: int, work: Path, parity: bool, judge: bool = True) -> tuple[dict, list]:
    """Train one arm, put its model in an open_clip folder, score it; (scores, val curve). Without `judge`
    (tuning), the scores are the run's last validation metrics and no test set is touched."""
    cfg = load_config(arm.dataset.config)
    overrides = {**arm.overrides, **_scaled_lr(cfg, arm)}
    if parity and arm.dataset.parity_train:
        overrides["data.train"] = arm.dataset.parity_train
    for key, value in overrides.items():  # the run as it trains: open_clip_train reads its settings from it
        _assign(cfg, key, value)
    work.mkdir(parents=True)
    if arm.trainer == "open_clip_train":
        model_dir = _train_open_clip(cfg, seed, work)
        curve = []
    else:
        sets = [f"{k}={v}" for k, v in {"output_dir": work / "run", "train.seed": seed, **overrides}.items()]
        train = [sys.executable, "-m", "pipeline", "train", arm.dataset.config, *sum((["--set", s] for s in sets), [])]
        try:
            _run(train, "mmclip train")
        except RuntimeError as exc:  # a seed's run is deterministic: a second try trains the same model
            if "data.timeout_s" not in str(exc):
                raise
            print(f"{arm.label}, seed {seed}: a loader worker hung (data.timeout_s); training it again", flush=True)
            shutil.rmtree(work / "run")
            _run(train, "mmclip train")
        rows = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in rows if VAL_METRIC in r]
        curve = [(r["step"] * cfg.data.batch_size, r[VAL_METRIC]) for r in evals]
        if not judge:
            return evals[-1], curve
        _run([sys.executable, "-m", "pipeline", "export", str(work / "run"), "--out", str(work / "export")],
             "mmclip export")
        model_dir = work / "export"
    scores = clip_benchmark_scores(model_dir, list(arm.dataset.sets), work)
    if arm.dataset.probe:
        scores.update(probe_scores(model_dir, arm.dataset.probe, work))
    return scores, curve


def _scaled_lr(cfg: RunConfig, arm: Arm) -> dict:
    if arm.batch is None:
        return {}
    return {"optim.lr": round(cfg.optim.lr * math.sqrt(arm.batch / cfg.data.batch_size), 8)}


def _assign(cfg: RunConfig, dotted: str, value) -> None:
    if dotted in ("loss", "data.hard_negatives", "eval.tasks"):
        return  # open_clip_train arms never set these; their mmclip twins pass them as --set
    section, key = dotted.split(".")
    if value == "null":
        value = None
    setattr(getattr(cfg, section), key, value)


def _train_open_clip(cfg: RunConfig, seed: int, work: Path) -> Path:
    model_json = work / "mmclip_quality_model.json"
    model_json.write_text(json.dumps(open_clip_model_config(cfg)))
    cmd = open_clip_cmd(cfg, model_json, work / "logs", cfg.data.batch_size, cfg.optim.total_steps,
                        cfg.data.workers, seed=seed, warmup=cfg.optim.warmup_steps, save=True)
    _run(cmd, "open_clip_train")
    checkpoints = sorted((work / "logs").glob("*/checkpoints/epoch_*.pt"))
    if not checkpoints:
        raise RuntimeError(f"open_clip_train saved no checkpoint under {work / 'logs'}")
    return open_clip_train_dir(checkpoints[-1], cfg, work / "export")


def english_only_copy(source_dir: Path, out: Path) -> None:
    """The study set's train shards with each caption's first (English) line only, written once."""
    import webdataset as wds

    source = sorted(source_dir.glob("train-*.tar"))
    if (out / "done").is_file() and (out / "done").read_text() == str(len(source)):
        return
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for tar in source:
        with wds.TarWriter(str(out / tar.name)) as sink:
            for s in wds.WebDataset(str(tar), shardshuffle=False):
                sink.write({"__key__": s["__key__"], "png": s["png"], "json": s["json"],
                            "txt": s["txt"].decode().splitlines()[0].encode()})
    (out / "done").write_text(str(len(source)))


def _require_data(dataset: Dataset) -> None:
    needed = [s.root for s in dataset.sets] + [p for p in (dataset.probe, dataset.val_probe) if p]
    missing = [p for p in needed if not (ROOT / p).is_dir()]
    if missing:
        make = "mmclip data study --out data/shards/study" if dataset is STUDY else "make demo-data"
        raise UserError(f"the {dataset.name} is not built ({missing[0]} is missing); run: {make}")


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{what} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")


# ------------------------------------------------------------------------------------------------ report
COLUMNS = {"zero-shot acc1": "concepts/acc1", "image R@1": "retrieval/image_retrieval_recall@1",
           "text R@1": "retrieval/text_retrieval_recall@1", "probe": "probe/probe_acc"}
VAL_COLUMNS = {"val image R@1": VAL_METRIC, "val text R@1": "val/text_retrieval_recall@1",
               "val probe": "val_probe/probe_acc"}  # the tuning studies' scores, at the end of training
ALL_COLUMNS = {**COLUMNS, **VAL_COLUMNS}


def summary(report: dict) -> dict[tuple[str, str], dict[str, tuple[float, float, list[float]]]]:
    """(arm, dataset) -> column -> (mean, std over seeds, per-seed values)."""
    out = {}
    for label, dataset in report["arms"]:
        runs = [r for r in report["runs"] if (r["arm"], r["dataset"]) == (label, dataset)]
        out[(label, dataset)] = {}
        for column, key in ALL_COLUMNS.items():
            values = [r["scores"][key] for r in runs if key in r["scores"]]
            if values:
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                out[(label, dataset)][column] = (statistics.mean(values), std, values)
    return out


def markdown(report: dict) -> str:
    table = summary(report)
    columns = [c for c in ALL_COLUMNS if any(c in row for row in table.values())]
    minutes = {}
    for r in report["runs"]:
        minutes[r["seed"]] = minutes.get(r["seed"], 0) + r["seconds"] / 60
    commits = Counter(r.get("commit", "not recorded") for r in report["runs"])
    judge = ("scored on the val split at the end of training (no test set is scored when tuning)"
             if report["study"].startswith("tune_") else
             "scored by CLIP_benchmark (probe: `mmclip eval --task compositional_probe`)")
    lines = [f"`mmclip bench quality --study {report['study']}`, seeds {report['seeds']}, {judge}; "
             f"mean ± std over seeds. {report['machine']}; "
             f"minutes per seed (all arms): {', '.join(f'{m:.0f}' for m in minutes.values())}; runs per commit: "
             f"{', '.join(f'{c} {n}' for c, n in commits.items())}.", "",
             "| data | arm | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for (label, dataset), row in table.items():
        cells = [("–" if c not in row else f"{row[c][0]:.3f} ± {row[c][1]:.3f}" if len(row[c][2]) > 1
                  else f"{row[c][0]:.3f} (1 seed)") for c in columns]
        lines.append(f"| {dataset} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", *verdict(report["study"], table)]) + "\n"


def verdict(study: str, table: dict) -> list[str]:
    """The issue's question for each study, in numbers: parity within open_clip_train's std, the share of the
    small-batch gap the global loss recovers, the hard negatives' gain on the probe and cost in zero-shot."""
    def diff(arm: str, base: str, column: str, dataset: str = STUDY.name) -> float:
        return table[(arm, dataset)][column][0] - table[(base, dataset)][column][0]

    table = {key: row for key, row in table.items() if row}  # arms not run (yet) have no verdict
    if study == "parity":
        return [f"- {dataset}, {column}: mmclip − open_clip_train = {diff('mmclip', 'open_clip_train', column, dataset):+.3f}"
                f" (open_clip_train's std {table[('open_clip_train', dataset)][column][1]:.3f})"
                for dataset in dict.fromkeys(d for _, d in table) for column in ("zero-shot acc1", "image R@1", "text R@1")]
    if study.startswith("small_batch"):
        low, ours = "InfoNCE, batch 32", "global_clip, batch 32"
        if not {(low, STUDY.name), (ours, STUDY.name)} <= set(table):
            return []
        lines = []
        for high in (a for a, _ in table if a.startswith("InfoNCE") and a != low):
            for column in ("image R@1", "text R@1"):
                gap = diff(high, low, column)
                lines.append(f"- {column}: {ours} recovers {diff(ours, low, column) / gap:.0%} of the gap between {low} "
                             f"and {high} ({gap:+.3f})" if gap > 0 else
                             f"- {column}: {high} is not above {low} ({gap:+.3f}): no gap to recover")
        return lines
    if study.startswith("tune_"):
        return tuning_verdict(table)
    if study != "hard_negatives":
        return []
    return [f"- {arm} (vs InfoNCE, points): "
            + ", ".join(f"{column} {100 * diff(arm, 'InfoNCE', column):+.1f}" for column in COLUMNS
                        if column in table[(arm, STUDY.name)])
            for arm, _ in table if arm != "InfoNCE"]


def tuning_verdict(table: dict) -> list[str]:
    """Each setting against the study's first arm (the baseline) in val points, and the best by each column."""
    if not table:
        return []
    base = next(iter(table))
    columns = [c for c in VAL_COLUMNS if c in table[base]]

    def points(key: tuple[str, str], column: str) -> float:
        return 100 * (table[key][column][0] - table[base][column][0])

    lines = [f"- {key[0]} (vs {base[0]}, val points): " + ", ".join(f"{c} {points(key, c):+.1f}" for c in columns)
             for key in table if key != base]
    return lines + [f"- best {c}: {max(table, key=lambda key: table[key][c][0])[0]}" for c in columns]


def plot_curves(report: dict, path: Path) -> None:
    """Validation image→text R@1 against samples seen, mean over seeds, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (label, dataset) in enumerate(report["arms"]):
        curves = [r["curve"] for r in report["runs"] if (r["arm"], r["dataset"]) == (label, dataset) and r["curve"]]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        xs = [curves[0][k][0] for k in range(n)]
        ax.plot(xs, [statistics.mean(c[k][1] for c in curves) for k in range(n)], "o-", color=f"C{i}", label=label)
    ax.set_xlabel("samples seen")
    ax.set_ylabel("val image R@1 (mean over seeds)")
    ax.set_title(f"{report['study']} on the study set")
    ax.grid(alpha=0.3)
    if ax.lines:  # no arm has a curve yet (e.g. a study cut short before its first mmclip run)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
