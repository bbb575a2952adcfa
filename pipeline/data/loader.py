"""The streaming data path: shard urls -> tar members -> shuffle -> decode -> preprocess -> batch.

Each stage is a small generator; a torch DataLoader runs the whole chain in `data.workers`
processes. Bad samples never stop a run: each is counted under its reason and the counts travel
with the batches (`batch["skipped"]`, new counts since the worker's previous batch), so the
trainer can sum them across workers and ranks.
"""
from __future__ import annotations

import contextlib
import random
import signal
import sys
from collections import Counter
from typing import Any, Callable, Iterator, Literal, cast

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.batch import Batch
from pipeline.data.config import DataConfig
from pipeline.data.decode import decode_sample, lazy_extensions
from pipeline.data.tars import tar_samples
from pipeline.data.sources import Seen, epoch_order, epoch_share, epoch_urls, expand_spec, resampled_urls, shard_sizes
from pipeline.modalities.base import Skip
from pipeline.registry import MODALITIES


def _register_fsspec_schemes() -> None:
    """s3://, gs:// and hf:// shards open through fsspec (webdataset itself handles local, pipe: and http)."""
    import importlib

    import fsspec
    from fsspec.core import OpenFile

    schemes = importlib.import_module("webdataset.gopen").gopen_schemes  # the attribute is the function gopen
    for scheme in ("s3", "gs", "hf"):
        # fsspec.open returns one OpenFile; its type is inferred from `open_files(...)[0]` as OpenFiles
        schemes[scheme] = lambda url, mode="rb", bufsize=8192: cast(OpenFile, fsspec.open(url, mode)).open()


def sample_offsets(sources, sizes: dict[str, int]) -> dict[str, int] | None:
    """Global index of each shard's first sample: shards in spec order (`::` sources concatenated), each
    shard's count from sizes.json or _stats.json. None when a count is unknown (indices are then -1)."""
    offsets, total = {}, 0
    for url in (u for s in sources for u in s.urls):
        if url not in sizes:
            return None
        offsets.setdefault(url, total)
        total += sizes[url]
    return offsets


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
        if url is not None and seen == sizes.get(url):
            url, seen = None, 0  # complete; the same shard may be drawn again right away
        yield sample
    close()


def unseen_share(samples: Iterator[dict], share: dict[str, range], seen: Seen) -> Iterator[dict]:
    """The samples of `share` (see `epoch_share`): its shards are read whole; samples the epoch already gave
    are passed over, and of the rest only the positions in the share are kept."""
    position: Counter = Counter()
    for sample in samples:
        if sample["__index__"] in seen:
            continue
        url = sample["__url__"]
        position[url] += 1
        if position[url] - 1 in share[url]:
            yield sample


def seed_preprocessors(preprocess: dict[str, Callable], rng: random.Random) -> None:
    for p in preprocess.values():
        if hasattr(p, "rng"):
            p.rng.seed(rng.random())


def held_bytes(sample: dict) -> int:
    """What a buffered sample holds: its members' bytes, or for a member left in a local shard (MemberRef) the
    reference alone (its path string is one per shard, shared by every reference into it)."""
    return sum(sys.getsizeof(v) for v in sample.values())


def shuffled(samples: Iterator[dict], bufsize: int, max_bytes: float, rng: random.Random,
             initial: int = 100) -> Iterator[dict]:
    """webdataset's shuffle (yield a random buffered sample per sample read, from `initial` on, reading two
    per yield while the buffer fills) with the buffer bounded by the raw bytes it holds as well as by its
    sample count: samples differ by 100x in size (a JPEG, a minute of FLAC), a count alone does not bound
    a worker's memory."""
    buf, held = [], 0  # buf: (held bytes, sample)

    def full() -> bool:
        return len(buf) >= bufsize or held >= max_bytes

    def add(sample: dict) -> None:
        nonlocal held
        buf.append((held_bytes(sample), sample))
        held += buf[-1][0]

    def pick() -> dict:
        nonlocal held
        i = rng.randrange(len(buf))
        buf[i], buf[-1] = buf[-1], buf[i]
        size, sample = buf.pop()
        held -= size
        return sample

    for sample in samples:
        add(sample)
        if not full():
            extra = next(samples, None)
            if extra is not None:
                add(extra)
        if len(buf) >= min(initial, bufsize) or full():
            yield pick()
        while held > max_bytes:  # big samples replaced small ones
            yield pick()
    while buf:
        yield pick()


class NoData(Exception):
    """The shards this worker reads give no usable sample: stop the run instead of looping."""


class NoDataGuard:
    """Counts shard reads that gave no sample and samples skipped in a row; past a bound it raises NoData.

    Resampled streams are infinite, so a source that yields nothing (empty or unreadable tars, every
    sample corrupt) would otherwise make a run wait for its first batch for ever.
    """

    def __init__(self, max_empty_shards: int, max_skips: int, skipped: Counter):
        self.max_empty_shards, self.max_skips, self.counts = max_empty_shards, max_skips, skipped
        self.empty_in_a_row: list[str] = []
        self.skips_in_a_row, self.skip_urls = 0, []
        self.shards_read = 0
        self.totals: Counter = Counter()  # since the stream started (`counts` is emptied at every batch)

    def read(self, urls: Iterator[dict], offsets: dict[str, int] | None = None,
             lazy: frozenset[str] = frozenset()) -> Iterator[dict]:
        """Raw samples, shard by shard, so a shard that gives none is noticed; with `offsets` (see
        `sample_offsets`) each sample gets its global index `__index__`; `lazy`: see `tar_samples`."""
        def on_read_error(exc: Exception) -> bool:
            reason = f"read_error_{type(exc).__name__}"
            self.counts[reason] += 1
            self.totals[reason] += 1
            return True  # continue with the next member/shard

        for source in urls:
            self.shards_read += 1
            n = 0
            for raw in tar_samples([source], on_read_error, lazy):
                if offsets is not None:
                    raw["__index__"] = offsets[source["url"]] + n
                n += 1
                yield raw
            self.empty_in_a_row = [] if n else self.empty_in_a_row + [source["url"]]
            if len(self.empty_in_a_row) >= self.max_empty_shards:
                raise NoData(f"{len(self.empty_in_a_row)} shard reads in a row gave no sample "
                             f"(data.max_empty_shards={self.max_empty_shards}): {self._names(self.empty_in_a_row)}; "
                             f"{self._reasons()}; check that these tars are complete and hold samples")

    def skipped(self, reason: str, url: str | None) -> None:
        self.counts[reason] += 1
        self.totals[reason] += 1
        self.skips_in_a_row += 1
        if url and url not in self.skip_urls:
            self.skip_urls.append(url)
        if self.skips_in_a_row >= self.max_skips:
            raise NoData(f"{self.skips_in_a_row} samples in a row were skipped (data.max_skips_in_a_row="
                         f"{self.max_skips}) from {self._names(self.skip_urls)}; {self._reasons()}")

    def used(self) -> None:
        self.skips_in_a_row, self.skip_urls = 0, []

    @staticmethod
    def _names(urls: list[str]) -> str:
        unique = list(dict.fromkeys(urls))
        return ", ".join(unique[:3]) + (f" and {len(unique) - 3} more" if len(unique) > 3 else "")

    def _reasons(self) -> str:
        return "skipped by reason: " + (", ".join(f"{k}={v}" for k, v in sorted(self.totals.items())) or "none")


class ShardStream(IterableDataset):
    def __init__(self, cfg: DataConfig, spec: str, weights, modalities: list[str], preprocess: dict[str, Callable],
                 train: bool, resampled: bool, rank: int, world_size: int, seed: int, start_step: int,
                 epoch: int, local_batch: int, seen: Seen):
        self.cfg, self.modalities, self.preprocess = cfg, modalities, preprocess
        self.sources = expand_spec(spec, weights, key="data.train" if train else "data.val")
        self.train, self.resampled = train, resampled
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.start_step, self.epoch, self.local_batch, self.seen = start_step, epoch, local_batch, seen
        self.sections = {m: cfg.modality(m) for m in modalities}
        self.lazy = lazy_extensions(self.sections)
        self.kinds = {m: MODALITIES.get(m, "data").obj for m in modalities}
        self.sizes = shard_sizes([u for s in self.sources for u in s.urls])
        self.offsets = sample_offsets(self.sources, self.sizes)
        self.negatives = cfg.hard_negatives if train else None

    def _share(self, worker: int, workers: int) -> dict[str, range] | None:
        """This (rank, worker)'s part of the epoch's unseen samples; None: whole shards (resampled, or a
        shard's sample count is unknown)."""
        if self.resampled or self.offsets is None:
            return None
        order = epoch_order(self.sources, self.seed, self.epoch)
        return epoch_share(order, self.sizes, self.offsets, self.seen, self.rank, self.world_size, worker, workers,
                           self.local_batch)

    def _urls(self, worker: int, workers: int, share: dict[str, range] | None) -> Iterator[dict]:
        if self.resampled:
            urls = resampled_urls(self.sources, self.seed, self.rank, worker, self.start_step)
        elif share is not None:
            urls = list(share)
        else:
            urls = epoch_urls(self.sources, self.seed, self.epoch, self.rank, self.world_size, worker, workers)
        return ({"url": u} for u in urls)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rng = random.Random(f"{self.seed}/{self.rank}/{worker}/{self.start_step}/{self.epoch}")
        seed_preprocessors(self.preprocess, rng)
        skipped: Counter = Counter()
        guard = NoDataGuard(self.cfg.max_empty_shards, self.cfg.max_skips_in_a_row, skipped)
        share = self._share(worker, workers)
        try:
            yield from self._batches(self._urls(worker, workers, share), share, rng, skipped, guard)
        except NoData as exc:  # handed to the trainer as a record: worker exceptions reach it as tracebacks
            yield {"fatal": str(exc)}

    def _batches(self, urls, share: dict[str, range] | None, rng: random.Random, skipped: Counter,
                 guard: "NoDataGuard") -> Iterator[Batch | dict[str, Any]]:
        samples = guard.read(urls, self.offsets, self.lazy)
        samples = count_short_shards(samples, self.sizes, skipped)
        if share is not None:
            samples = unseen_share(samples, share, self.seen)
        if self.train and self.cfg.shuffle_buffer > 1:
            samples = shuffled(samples, self.cfg.shuffle_buffer, self.cfg.shuffle_buffer_mib * 2**20, rng)
        # A finished batch is held back until the next one (or the end), so skips that happen after
        # the last full batch of a finite stream are still reported with it.
        batch, pending = [], None
        for raw in samples:
            try:
                with self._sample_rng(raw, rng) as sample_rng:
                    batch.append(self._prepare(raw, sample_rng))
            except Skip as skip:
                guard.skipped(skip.reason, raw.get("__url__"))
                continue
            guard.used()
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
        elif batch:  # training takes full batches only: what is left at the end of a finite stream is counted
            skipped["partial_last_batch"] += len(batch)
        if pending is not None:
            pending["skipped"] = dict(Counter(pending.get("skipped", {})) + skipped)
            yield pending
        elif skipped or guard.shards_read:  # a finite stream that made no batch still reports what it saw
            yield {"skipped": dict(skipped), "shards": guard.shards_read}

    @contextlib.contextmanager
    def _sample_rng(self, raw: dict, rng: random.Random) -> Iterator[random.Random]:
        """In epoch mode a sample's random choices (its caption; its crop, drawn from torch's generator) follow
        from (seed, epoch, its index) alone, not from the rank or worker that reads it: an epoch split over
        another number of ranks mid-way augments each sample as it would have been."""
        if self.resampled or raw.get("__index__", -1) < 0:
            yield rng
            return
        own = random.Random(f"{self.seed}/{self.epoch}/{raw['__index__']}")
        seed_preprocessors(self.preprocess, own)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(own.getrandbits(63))
            yield own

    def _prepare(self, raw: dict, rng: random.Random) -> dict:
        sample = decode_sample(raw, self.sections, self.negatives)
        present = [m for m in self.modalities if m in sample]
        if not present:
            raise Skip("no_modalities")
        if self.cfg.missing_modality == "drop" and len(present) < len(self.modalities):
            raise Skip("missing_" + next(m for m in self.modalities if m not in sample))
        out = {"key": sample["key"], "label": sample.get("label", -1), "index": raw.get("__index__", -1)}
        for m in present:
            try:
                out[m] = self.preprocess[m](self.kinds[m].select(sample[m], rng, self.train))
            except Skip:  # a modality's own reason (e.g. corrupt_image found when the pixels are decoded)
                raise
            except Exception as exc:  # a transform failing on one sample must not stop the stream
                raise Skip(f"bad_{m}") from exc
        if self.negatives:
            negs = sample.get("negatives") or []
            if not negs:
                raise Skip("missing_negatives")
            negs = (negs * self.negatives.k)[: self.negatives.k]
            out[f"{self.negatives.modality}_neg"] = torch.stack([self.preprocess[self.negatives.modality](v)
                                                                 for v in negs])
        return out

    def _collate(self, items: list[dict], skipped: Counter) -> Batch:
        batch: Batch = {"key": [it["key"] for it in items], "label": torch.tensor([it["label"] for it in items]),
                        "index": torch.tensor([it["index"] for it in items]), "mask": {}, "skipped": dict(skipped)}
        for m in self.modalities:
            pre = self.preprocess[m]
            placeholder = torch.zeros(pre.shape, dtype=pre.dtype)
            batch[m] = getattr(pre, "collate", torch.stack)([it.get(m, placeholder) for it in items])
            batch["mask"][m] = torch.tensor([m in it for it in items])
        if self.negatives:
            key = f"{self.negatives.modality}_neg"
            batch[key] = torch.stack([it[key] for it in items])
        return batch


def _leave_signals_to_main(_worker_id: int) -> None:
    """Workers ignore stop signals (Ctrl-C reaches the whole process group, Slurm signals every process):
    the main process decides when to stop and shuts its workers down."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def build_loader(cfg: DataConfig, *, split: Literal["train", "val"], modalities: list[str],
                 preprocess: dict[str, Callable], rank: int = 0, world_size: int = 1, seed: int = 0,
                 start_step: int = 0, epoch: int = 0, resampled: bool | None = None,
                 seen: Seen | None = None) -> DataLoader:
    """Batches of `cfg.batch_size // world_size` samples for this rank (see module docstring); in epoch mode
    without the samples `seen` earlier in the epoch."""
    if cfg.batch_size % world_size:
        raise ValueError(f"data.batch_size={cfg.batch_size} is not divisible by {world_size} ranks")
    _register_fsspec_schemes()
    train = split == "train"
    spec = cfg.train if train else cfg.val
    if spec is None:
        raise ValueError("data.val is not set")
    stream = ShardStream(cfg, spec, cfg.train_weights if train else None, modalities, preprocess, train,
                         cfg.resampled if resampled is None else resampled, rank, world_size, seed, start_step,
                         epoch, cfg.batch_size // world_size, seen or Seen())
    generator = torch.Generator().manual_seed(hash((seed, rank, start_step, epoch)) % 2**62)
    if cfg.workers:
        # Batches reach this process as shared-memory files named in the message (torch_shm_manager removes
        # them when both ends are gone), not as file descriptors handed over by a server thread in each worker:
        # a stop signal that ends the wait for a batch mid-handover left that thread to print a traceback.
        torch.multiprocessing.set_sharing_strategy("file_system")
    return DataLoader(stream, batch_size=None, num_workers=cfg.workers, generator=generator,
                      persistent_workers=False, prefetch_factor=2 if cfg.workers else None,
                      timeout=cfg.timeout_s if cfg.workers else 0,
                      worker_init_fn=_leave_signals_to_main if cfg.workers else None)
