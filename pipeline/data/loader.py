"""The streaming data path: shard urls -> tar members -> shuffle -> decode -> preprocess -> batch.

Each stage is a small generator; a torch DataLoader runs the whole chain in `data.workers`
processes. Bad samples never stop a run: each is counted under its reason and the counts travel
with the batches (`batch["skipped"]`, new counts since the worker's previous batch), so the
trainer can sum them across workers and ranks.
"""
from __future__ import annotations

import random
from collections import Counter
from typing import Callable, Iterator, Literal

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.config import DataConfig
from pipeline.data.decode import Skip, decode_sample
from pipeline.data.sources import epoch_urls, expand_spec, resampled_urls, shard_sizes

MODALITIES = ("image", "text", "audio")


def _register_fsspec_schemes() -> None:
    """s3:// and gs:// shards open through fsspec (webdataset itself handles local, pipe: and http)."""
    import sys

    import fsspec

    schemes = sys.modules["webdataset.gopen"].gopen_schemes
    for scheme in ("s3", "gs"):
        schemes[scheme] = lambda url, mode="rb", bufsize=8192: fsspec.open(url, mode).open()


def count_short_shards(samples: Iterator[dict], sizes: dict[str, int], skipped: Counter) -> Iterator[dict]:
    """A tar cut at a block boundary reads as a shorter, valid tar; sizes.json tells us what went missing."""
    url, seen = None, 0

    def close():
        if url in sizes and 0 < seen < sizes[url]:
            skipped["missing_in_truncated_shard"] += sizes[url] - seen

    for sample in samples:
        if sample.get("__url__") != url:
            close()
            url, seen = sample.get("__url__"), 0
        seen += 1
        if seen == sizes.get(url):
            url, seen = None, 0  # complete; the same shard may be drawn again right away
        yield sample
    close()


class ShardStream(IterableDataset):
    def __init__(self, cfg: DataConfig, spec: str, weights, modalities: list[str], preprocess: dict[str, Callable],
                 train: bool, resampled: bool, rank: int, world_size: int, seed: int, start_step: int,
                 epoch: int, local_batch: int):
        self.cfg, self.modalities, self.preprocess = cfg, modalities, preprocess
        self.sources = expand_spec(spec, weights, key="data.train" if train else "data.val")
        self.train, self.resampled = train, resampled
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.start_step, self.epoch, self.local_batch = start_step, epoch, local_batch
        self.extensions = {m: getattr(cfg, m).extensions for m in modalities}
        self.sizes = shard_sizes([u for s in self.sources for u in s.urls])
        self.negatives = cfg.hard_negatives if train else None

    def _urls(self, worker: int, workers: int) -> Iterator[dict]:
        if self.resampled:
            urls = resampled_urls(self.sources, self.seed, self.rank, worker, self.start_step)
        else:
            urls = epoch_urls(self.sources, self.seed, self.epoch, self.rank, self.world_size, worker, workers)
        return ({"url": u} for u in urls)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rng = random.Random(f"{self.seed}/{self.rank}/{worker}/{self.start_step}/{self.epoch}")
        for p in self.preprocess.values():
            if hasattr(p, "rng"):
                p.rng.seed(rng.random())
        skipped: Counter = Counter()

        def on_read_error(exc: Exception) -> bool:
            skipped[f"read_error_{type(exc).__name__}"] += 1
            return True  # continue with the next member/shard

        samples = wds.tarfile_to_samples(handler=on_read_error)(self._urls(worker, workers))
        samples = count_short_shards(samples, self.sizes, skipped)
        if self.train and self.cfg.shuffle_buffer > 1:
            samples = wds.shuffle(self.cfg.shuffle_buffer, initial=min(100, self.cfg.shuffle_buffer), rng=rng)(samples)
        # A finished batch is held back until the next one (or the end), so skips that happen after
        # the last full batch of a finite stream are still reported with it.
        batch, pending = [], None
        for raw in samples:
            try:
                batch.append(self._prepare(raw, rng))
            except Skip as skip:
                skipped[skip.reason] += 1
                continue
            if len(batch) == self.local_batch:
                if pending is not None:
                    yield pending
                pending, batch = self._collate(batch, skipped), []
                skipped.clear()  # the stages hold this counter: empty it, never replace it
        if batch and not self.train:
            if pending is not None:
                yield pending
            pending = self._collate(batch, skipped)
            skipped.clear()
        if pending is not None:
            pending["skipped"] = dict(Counter(pending["skipped"]) + skipped)
            yield pending

    def _prepare(self, raw: dict, rng: random.Random) -> dict:
        neg_ext = self.negatives.extension if self.negatives else None
        sample = decode_sample(raw, self.extensions, self.cfg.text.json_key, neg_ext)
        present = [m for m in self.modalities if m in sample]
        if not present:
            raise Skip("no_modalities")
        if self.cfg.missing_modality == "drop" and len(present) < len(self.modalities):
            raise Skip("missing_" + next(m for m in self.modalities if m not in sample))
        out = {"key": sample["key"], "label": sample.get("label", -1)}
        for m in present:
            value = sample[m]
            if m == "text":  # several captions: a random one to train on, the first to evaluate
                value = rng.choice(value) if self.train else value[0]
            try:
                out[m] = self.preprocess[m](value)
            except Exception as exc:  # a transform failing on one sample must not stop the stream
                raise Skip(f"bad_{m}") from exc
        if self.negatives:
            negs = sample.get("negatives") or []
            if not negs:
                raise Skip("missing_negatives")
            negs = (negs * self.negatives.k)[: self.negatives.k]
            out["text_neg"] = self.preprocess["text"](negs)
        return out

    def _collate(self, items: list[dict], skipped: Counter) -> dict:
        batch = {"key": [it["key"] for it in items], "label": torch.tensor([it["label"] for it in items]),
                 "mask": {}, "skipped": dict(skipped)}
        for m in self.modalities:
            proto = torch.zeros(self.preprocess[m].shape, dtype=torch.long if m == "text" else torch.float32)
            batch[m] = torch.stack([it.get(m, proto) for it in items])
            batch["mask"][m] = torch.tensor([m in it for it in items])
        if self.negatives:
            batch["text_neg"] = torch.stack([it["text_neg"] for it in items])
        return batch


def build_loader(cfg: DataConfig, *, split: Literal["train", "val"], modalities: list[str],
                 preprocess: dict[str, Callable], rank: int = 0, world_size: int = 1, seed: int = 0,
                 start_step: int = 0, epoch: int = 0, resampled: bool | None = None) -> DataLoader:
    """Batches of `cfg.batch_size // world_size` samples for this rank (see module docstring)."""
    if cfg.batch_size % world_size:
        raise ValueError(f"data.batch_size={cfg.batch_size} is not divisible by {world_size} ranks")
    _register_fsspec_schemes()
    train = split == "train"
    spec = cfg.train if train else cfg.val
    if spec is None:
        raise ValueError("data.val is not set")
    stream = ShardStream(cfg, spec, cfg.train_weights if train else None, modalities, preprocess, train,
                         cfg.resampled if resampled is None else resampled, rank, world_size, seed, start_step,
                         epoch, cfg.batch_size // world_size)
    generator = torch.Generator().manual_seed(hash((seed, rank, start_step, epoch)) % 2**62)
    return DataLoader(stream, batch_size=None, num_workers=cfg.workers, generator=generator,
                      persistent_workers=False, prefetch_factor=2 if cfg.workers else None)
