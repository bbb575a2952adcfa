"""`mmclip bench data`: samples/s of the whole decode + transform + batch path, ours vs open_clip's loader.

Both read the same shards with the same image transform, tokenizer, batch size and worker count;
the first batches (worker start-up, shuffle-buffer fill) are excluded. open_clip's
`get_wds_dataset` reads image+text only, so audio+text is measured for mmclip alone.
"""
from __future__ import annotations

import json
import os
import time
from argparse import Namespace
from pathlib import Path

from pipeline.config import DataConfig, load_config

WARMUP_BATCHES = 3


def _rate(batches, n_batches: int, batch_size: int) -> float:
    it = iter(batches)
    for _ in range(WARMUP_BATCHES):
        next(it)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    return n_batches * batch_size / (time.perf_counter() - t0)


def _ours(spec: str, modalities: list[str], config: str, batch_size: int, workers: int, n_batches: int) -> float:
    from pipeline.data.loader import build_loader
    from pipeline.models import build_model
    from pipeline.models.preprocess import tower_preprocessors

    cfg = load_config(config)
    data = DataConfig(train=spec, batch_size=batch_size, workers=workers, audio=cfg.data.audio)
    model = build_model(cfg.model)
    preprocess = {m: p for m, p in tower_preprocessors(model, data.audio, train=True).items() if m in modalities}
    return _rate(build_loader(data, split="train", modalities=modalities, preprocess=preprocess), n_batches, batch_size)


def _open_clip(spec: str, config: str, batch_size: int, workers: int, n_batches: int) -> float:
    from open_clip_train.data import get_wds_dataset

    from pipeline.data.preprocess import ImageTransform, TextTokenizer
    from pipeline.models import build_model

    model = build_model(load_config(config).model)
    image, text = model.towers["image"].preprocess, model.towers["text"].preprocess
    transform = ImageTransform(image.image_size, image.mean, image.std, train=True).transform
    args = Namespace(train_data=spec, val_data=None, train_num_samples=batch_size * (n_batches + 10) * 4,
                     val_num_samples=None, dataset_resampled=True, batch_size=batch_size, workers=workers,
                     world_size=1, distributed=False, seed=0, train_data_upsampling_factors=None,
                     csv_img_key="filepath", csv_caption_key="title", csv_separator="\t")
    info = get_wds_dataset(args, transform, is_train=True, tokenizer=TextTokenizer(text.context_length).tokenizer)
    return _rate(info.dataloader, n_batches, batch_size)


def run_data_bench(shards: str | None, batch_size: int, workers: int, n_batches: int, out_dir: str) -> dict:
    spec = shards or "data/shards/demo/train/train-{000000..000005}.tar"
    cores = os.cpu_count()
    rows = {
        "image+text": {"mmclip": _ours(spec, ["image", "text"], "configs/demo.yaml", batch_size, workers, n_batches),
                       "open_clip": _open_clip(spec, "configs/demo.yaml", batch_size, workers, n_batches)},
        "audio+text": {"mmclip": _ours(spec, ["audio", "text"], "configs/demo_symile.yaml", batch_size, workers,
                                       n_batches),
                       "open_clip": None},
    }
    report = {"shards": spec, "batch_size": batch_size, "workers": workers, "batches": n_batches, "cpus": cores,
              "samples_per_s": rows}
    lines = [f"Shards `{spec}`, batch {batch_size}, {workers} worker(s), {n_batches} batches after "
             f"{WARMUP_BATCHES} warm-up, {cores} CPU cores.", "",
             "| modalities | mmclip samples/s | per core | open_clip samples/s | per core |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        oc = f"{r['open_clip']:.0f} | {r['open_clip'] / cores:.0f}" if r["open_clip"] else \
            "n/a (image+text only) | -"
        lines.append(f"| {name} | {r['mmclip']:.0f} | {r['mmclip'] / cores:.0f} | {oc} |")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data.json").write_text(json.dumps(report, indent=2))
    (out / "data.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report
