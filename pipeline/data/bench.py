"""`mmclip bench data`: samples/s of the whole decode + transform + batch path, ours vs open_clip's loader.

Both read the same shards with the same image transform, tokenizer, batch size and worker count;
the first batches (worker start-up, shuffle-buffer fill) are excluded. open_clip's
`get_wds_dataset` reads image+text only, so audio+text is measured for mmclip alone. Worker counts
are swept, since on few cores the loader competes with itself for them.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from argparse import Namespace
from pathlib import Path

from pipeline.config import DataConfig
from pipeline.registry import MODALITIES

WARMUP_BATCHES = 3


def _rate(batches, n_batches: int, batch_size: int) -> float:
    it = iter(batches)
    for _ in range(WARMUP_BATCHES):
        next(it)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    return n_batches * batch_size / (time.perf_counter() - t0)


def _preprocessors(towers: dict, data: DataConfig, modalities: list[str]) -> dict:
    return {m: MODALITIES.get(m, "bench").obj.preprocessor(towers[m], data.modality(m), True) for m in modalities}


def _ours(spec: str, modalities: list[str], setup: tuple, batch_size: int, workers: int, n_batches: int) -> float:
    from pipeline.data.loader import build_loader

    towers, run_data = setup
    sections = {m: run_data.modality(m) for m in modalities}
    data = DataConfig(train=spec, batch_size=batch_size, workers=workers, **sections)
    preprocess = _preprocessors(towers, data, modalities)
    return _rate(build_loader(data, split="train", modalities=modalities, preprocess=preprocess), n_batches, batch_size)


def _open_clip(spec: str, setup: tuple, batch_size: int, workers: int, n_batches: int) -> float:
    from open_clip_train.data import get_wds_dataset

    towers, run_data = setup
    pre = _preprocessors(towers, run_data, ["image", "text"])
    args = Namespace(train_data=spec, val_data=None, train_num_samples=batch_size * (n_batches + 10) * 4,
                     val_num_samples=None, dataset_resampled=True, batch_size=batch_size, workers=workers,
                     world_size=1, distributed=False, seed=0, train_data_upsampling_factors=None,
                     csv_img_key="filepath", csv_caption_key="title", csv_separator="\t")
    info = get_wds_dataset(args, pre["image"].transform, is_train=True, tokenizer=pre["text"].tokenizer)
    return _rate(info.dataloader, n_batches, batch_size)


def run_data_bench(shards: str | None, batch_size: int, workers: list[int], n_batches: int, out_dir: str,
                   setups: dict[str, tuple], repeats: int = 3) -> dict:
    """Every (modalities, loader, worker count) cell is the median of `repeats` runs, interleaved.

    `setups` maps a run config to (its towers' input descriptions, its data section): the data layer knows
    no model, so the caller builds them."""
    spec = shards or "data/shards/demo/train/train-{000000..000005}.tar"
    cores = os.cpu_count()
    measures = {
        ("image+text", "mmclip"): lambda w: _ours(spec, ["image", "text"], setups["configs/demo.yaml"], batch_size,
                                                  w, n_batches),
        ("image+text", "open_clip"): lambda w: _open_clip(spec, setups["configs/demo.yaml"], batch_size, w,
                                                          n_batches),
        ("audio+text", "mmclip"): lambda w: _ours(spec, ["audio", "text"], setups["configs/demo_symile.yaml"],
                                                  batch_size, w, n_batches),
    }
    runs = {(m, impl, w): [] for (m, impl) in measures for w in workers}
    for _ in range(repeats):
        for (m, impl), measure in measures.items():
            for w in workers:
                runs[(m, impl, w)].append(measure(w))
    rows = [{"modalities": m, "loader": impl, "workers": w, "samples_per_s": statistics.median(r), "runs": r}
            for (m, impl, w), r in runs.items()]
    report = {"shards": spec, "batch_size": batch_size, "batches": n_batches, "repeats": repeats, "cpus": cores,
              "rows": rows}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data.json").write_text(json.dumps(report, indent=2))
    table = markdown_table(report)
    (out / "data.md").write_text(table)
    plot(report, out / "data.png")
    print(table)
    return report


def markdown_table(r: dict) -> str:
    def cell(m, impl, w):
        row = next((x for x in r["rows"] if (x["modalities"], x["loader"], x["workers"]) == (m, impl, w)), None)
        return f"{row['samples_per_s']:.0f} | {row['samples_per_s'] / r['cpus']:.0f}" if row else "n/a | -"

    lines = [f"Shards `{r['shards']}`, batch {r['batch_size']}, {r['batches']} batches after {WARMUP_BATCHES} "
             f"warm-up, {r['cpus']} CPU cores; median of {r['repeats']} interleaved runs; per core = samples/s "
             f"÷ {r['cpus']}. open_clip's loader reads image+text only.", "",
             "| modalities | workers | mmclip samples/s | per core | open_clip samples/s | per core |",
             "|---|---|---|---|---|---|"]
    for m in dict.fromkeys(x["modalities"] for x in r["rows"]):
        for w in sorted({x["workers"] for x in r["rows"]}):
            lines.append(f"| {m} | {w} | {cell(m, 'mmclip', w)} | {cell(m, 'open_clip', w)} |")
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    series = dict.fromkeys((x["modalities"], x["loader"]) for x in r["rows"])
    for m, impl in series:
        pts = sorted((x["workers"], x["samples_per_s"], x["runs"]) for x in r["rows"]
                     if (x["modalities"], x["loader"]) == (m, impl))
        line, = ax.plot([w for w, _, _ in pts], [v for _, v, _ in pts], "o-" if impl == "mmclip" else "s--",
                        label=f"{impl} {m}")
        for w, _, runs in pts:
            ax.plot([w] * len(runs), runs, ".", color=line.get_color(), alpha=0.5)
    ax.set_xticks(sorted({x["workers"] for x in r["rows"]}))
    ax.set_xlabel("data-loader workers")
    ax.set_ylabel("samples/s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
