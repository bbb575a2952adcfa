"""`mmclip bench data`: samples/s of the whole decode + transform + batch path, ours vs open_clip's loader.

Both read the same shards with the same tokenizer, batch size and worker count; open_clip's loader
gets open_clip's own train transform (float ToTensor + Normalize at full decode), ours its train path
(draft JPEG decode, uint8 crops; see pipeline.modalities.image). The first batches (worker start-up,
shuffle-buffer fill) are excluded. open_clip's `get_wds_dataset` reads image+text only, so audio is
measured for mmclip alone. Worker counts are swept, since on few cores the loader competes with
itself for them. Every cell is the median of `repeats` runs, interleaved.

Two data sets: the demo shards (default), and with `--realistic` the synthesised photo-like JPEGs and
10-s / 60-s 48 kHz stereo FLACs of pipeline.bench.realistic_data (10-s crops from each: the crop's cost
should not depend on the file's length).
"""
from __future__ import annotations

import json
import os
import statistics
import time
from argparse import Namespace
from pathlib import Path
from typing import Callable

from pipeline.data.config import DataConfig
from pipeline.modalities.preprocess import preprocessors

WARMUP_BATCHES = 3


def warmup_batches(shuffle_buffer: int, workers: int, batch_size: int) -> int:
    """Batches until every worker's shuffle buffer is full (it reads two samples per yield while filling):
    the rate is measured in the steady state a training run spends its time in."""
    return max(WARMUP_BATCHES, -(-shuffle_buffer * max(1, workers) // batch_size))


def _rate(batches, n_batches: int, batch_size: int, warmup: int = WARMUP_BATCHES) -> float:
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    return n_batches * batch_size / (time.perf_counter() - t0)


def _preprocessors(towers: dict, data: DataConfig, modalities: list[str]) -> dict:
    return preprocessors({m: towers[m] for m in modalities}, data, train=True)


def _ours(spec: str, modalities: list[str], setup: tuple, batch_size: int, workers: int, n_batches: int) -> float:
    from pipeline.data.loader import build_loader

    towers, run_data = setup
    sections = {m: run_data.modality(m) for m in modalities}
    data = DataConfig(train=spec, batch_size=batch_size, workers=workers, shuffle_buffer=run_data.shuffle_buffer,
                      shuffle_buffer_mib=run_data.shuffle_buffer_mib, **sections)
    preprocess = _preprocessors(towers, data, modalities)
    return _rate(build_loader(data, split="train", modalities=modalities, preprocess=preprocess), n_batches, batch_size,
                 warmup_batches(data.shuffle_buffer, workers, batch_size))


def _open_clip(spec: str, setup: tuple, batch_size: int, workers: int, n_batches: int) -> float:
    from open_clip.transform import image_transform
    from open_clip_train.data import get_wds_dataset

    towers, run_data = setup
    image = towers["image"]
    transform = image_transform(image.image_size, is_train=True, mean=tuple(image.mean), std=tuple(image.std))
    tokenizer = _preprocessors(towers, run_data, ["text"])["text"].tokenizer
    args = Namespace(train_data=spec, val_data=None, train_num_samples=batch_size * (n_batches + 10) * 4,
                     val_num_samples=None, dataset_resampled=True, batch_size=batch_size, workers=workers,
                     world_size=1, distributed=False, seed=0, train_data_upsampling_factors=None,
                     csv_img_key="filepath", csv_caption_key="title", csv_separator="\t")
    info = get_wds_dataset(args, transform, is_train=True, tokenizer=tokenizer)
    return _rate(info.dataloader, n_batches, batch_size)


def run_data_bench(shards: str | None, batch_size: int, workers: list[int], n_batches: int, out_dir: str,
                   setups: dict[str, tuple], repeats: int = 3) -> dict:
    """The demo shards (or `shards`): image+text both loaders, audio+text ours.

    `setups` maps a run config to (its towers' input descriptions, its data section): the data layer knows
    no model, so the caller builds them."""
    spec = shards or "data/shards/demo/train/train-{000000..000005}.tar"
    measures = {
        ("image+text", "mmclip"): lambda w: _ours(spec, ["image", "text"], setups["configs/demo.yaml"], batch_size,
                                                  w, n_batches),
        ("image+text", "open_clip"): lambda w: _open_clip(spec, setups["configs/demo.yaml"], batch_size, w,
                                                          n_batches),
        ("audio+text", "mmclip"): lambda w: _ours(spec, ["audio", "text"], setups["configs/demo_symile.yaml"],
                                                  batch_size, w, n_batches),
    }
    report = {"shards": spec, "batch_size": batch_size, "batches": n_batches}
    return _sweep(measures, workers, repeats, report, Path(out_dir) / "data")


def run_realistic_data_bench(summary: dict, setup: tuple, batch_size: int, audio_batch_size: int,
                             workers: list[int], n_batches: int, out_dir: str, repeats: int = 3) -> dict:
    """The realistic sets (`summary` from pipeline.bench.realistic_data.build_realistic): image+text at the setup's
    image size, both loaders; and 10-s audio crops (the setup's data.audio) from 10-s and from 60-s files."""
    images = summary["images"]
    measures = {
        ("image+text", "mmclip"): lambda w: _ours(images, ["image", "text"], setup, batch_size, w, n_batches),
        ("image+text", "open_clip"): lambda w: _open_clip(images, setup, batch_size, w, n_batches),
    }
    for seconds in (10, 60):
        measures[(f"audio+text, {seconds}-s files", "mmclip")] = (
            lambda w, spec=summary[f"audio{seconds}"]: _ours(spec, ["audio", "text"], setup, audio_batch_size, w,
                                                             n_batches))
    audio = setup[1].modality("audio")
    report = {"shards": "data/shards/realistic (pipeline.bench.realistic_data)", "batch_size": batch_size,
              "audio_batch_size": audio_batch_size, "batches": n_batches, "mean_jpeg_kb": summary["mean_jpeg_kb"],
              "image_size": setup[0]["image"].image_size,
              "audio_crop": f"{audio.seconds:g} s at {audio.sample_rate} Hz, mono, {audio.crops} crop(s)"}
    return _sweep(measures, workers, repeats, report, Path(out_dir) / "data_realistic")


def _sweep(measures: dict[tuple[str, str], Callable[[int], float]], workers: list[int], repeats: int,
           report: dict, out_stem: Path) -> dict:
    runs = {(m, impl, w): [] for (m, impl) in measures for w in workers}
    for _ in range(repeats):  # interleaved, so machine noise hits every cell alike
        for (m, impl), measure in measures.items():
            for w in workers:
                runs[(m, impl, w)].append(measure(w))
    rows = [{"modalities": m, "loader": impl, "workers": w, "samples_per_s": statistics.median(r), "runs": r}
            for (m, impl, w), r in runs.items()]
    report = {**report, "repeats": repeats, "cpus": os.cpu_count(), "rows": rows}
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    out_stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    table = markdown_table(report)
    out_stem.with_suffix(".md").write_text(table)
    plot(report, out_stem.with_suffix(".png"))
    print(table)
    return report


def markdown_table(r: dict) -> str:
    def row(m, impl, w):
        return next((x for x in r["rows"] if (x["modalities"], x["loader"], x["workers"]) == (m, impl, w)), None)

    def cell(m, impl, w):
        x = row(m, impl, w)
        return f"{x['samples_per_s']:.0f} | {x['samples_per_s'] / r['cpus']:.0f}" if x else "n/a | -"

    def ratio(m, w):
        ours, theirs = row(m, "mmclip", w), row(m, "open_clip", w)
        return f"{ours['samples_per_s'] / theirs['samples_per_s']:.2f}x" if ours and theirs else "-"

    extra = "".join(f", {k.replace('_', ' ')} {r[k]}" for k in ("image_size", "mean_jpeg_kb", "audio_batch_size",
                                                                "audio_crop") if k in r)
    lines = [f"Shards `{r['shards']}`, batch {r['batch_size']}{extra}, {r['batches']} batches after "
             f"warm-up ({WARMUP_BATCHES} batches; mmclip's until its shuffle buffers are full), {r['cpus']} CPU cores; "
             f"median of {r['repeats']} interleaved runs; per "
             f"core = samples/s ÷ {r['cpus']}. open_clip's loader reads image+text only.", "",
             "| modalities | workers | mmclip samples/s | per core | open_clip samples/s | per core | mmclip ÷ open_clip |",
             "|---|---|---|---|---|---|---|"]
    for m in dict.fromkeys(x["modalities"] for x in r["rows"]):
        for w in sorted({x["workers"] for x in r["rows"]}):
            lines.append(f"| {m} | {w} | {cell(m, 'mmclip', w)} | {cell(m, 'open_clip', w)} | {ratio(m, w)} |")
    pairs = {w: (row("audio+text, 60-s files", "mmclip", w), row("audio+text, 10-s files", "mmclip", w))
             for w in sorted({x["workers"] for x in r["rows"]})}
    if all(long and short for long, short in pairs.values()):
        per_workers = (f"{w} worker(s) median {statistics.median(ratios):.2f}x, lowest {min(ratios):.2f}x"
                       for w, ratios in paired_audio_ratios(pairs).items())
        lines += ["", "10-s crops from 60-s files ÷ from 10-s files, per round (a round runs every cell once, so "
                  "a slow spell hits both runs of a pair): " + "; ".join(per_workers)]
    return "\n".join(lines) + "\n"


def paired_audio_ratios(pairs: dict) -> dict[int, list[float]]:
    """{workers: [60-s rate / 10-s rate of each round]}: pairing cancels the slow spells both runs of a round see."""
    return {w: [a / b for a, b in zip(long["runs"], short["runs"])] for w, (long, short) in pairs.items()}


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
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
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
