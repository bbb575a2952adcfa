"""Training batches across restarts: where the data stream is, so a resumed run continues it exactly.

Resampled streams are infinite and reseeded by step at every (re)start, so the batches after a
checkpoint are a function of the step (and the number of ranks) alone. Epoch streams read each
sample once per epoch; every rank takes the same number of batches per epoch (epoch size // global
batch, so collectives stay in step). The position (epoch, batches taken) is checkpointed with the
epoch's seen samples: on as many ranks the same stream is rebuilt and skipped into (bit for bit);
on another number, the samples not yet seen are split over the new ranks (a new "segment").
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import reduce
from itertools import islice
from typing import TYPE_CHECKING, Callable, Iterator

import torch.distributed as dist

from pipeline.data.config import DataConfig
from pipeline.data.sources import Seen, expand_spec, shard_sizes
from pipeline.errors import UserError
from pipeline.train.ranks import distributed

if TYPE_CHECKING:
    from pipeline.batch import Batch


def epoch_batches(cfg: DataConfig) -> int:
    if cfg.num_samples:
        total = cfg.num_samples
    else:
        urls = [u for s in expand_spec(cfg.train, cfg.train_weights) for u in s.urls]
        sizes = shard_sizes(urls)
        if len(sizes) < len(urls):
            raise UserError("data.resampled is false but the epoch size is unknown: set data.num_samples or put "
                            "sizes.json next to the shards")
        total = sum(sizes[u] for u in urls)
    if total < cfg.batch_size:
        raise UserError(f"an epoch of {total} samples is smaller than data.batch_size={cfg.batch_size}")
    return total // cfg.batch_size


@dataclass
class Tally:
    """What loader records that are not batches reported: skips still to hand on, and this epoch's totals."""

    pending: Counter = field(default_factory=Counter)
    epoch: Counter = field(default_factory=Counter)
    shards: int = 0


def only_batches(records, tally: Tally) -> Iterator[Batch]:
    """Loader records that are not batches (a fatal error, the tally of a worker that made no batch) are acted
    on here, so the loop and the epoch count only ever see batches. A module function, not a method: the
    stream must not be part of a reference cycle, or its loader workers outlive the run until a gc pass."""
    for record in records:
        if "fatal" in record:
            raise UserError(record["fatal"])
        if "shards" in record:
            tally.pending.update(record["skipped"])
            tally.epoch.update(record["skipped"])
            tally.shards += record["shards"]
            continue
        yield record


def gathered_seen(mine: Seen | None) -> Seen | None:
    """The union of every rank's seen samples (None if any rank's samples have no index)."""
    ranges = mine.ranges if mine is not None else None
    parts: list[list[tuple[int, int]] | None] = [ranges]
    if distributed():
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, ranges)
    return None if None in parts else reduce(Seen.union, map(Seen, parts))


class BatchStream:
    """`make_loader(step, epoch, seen)` builds this rank's loader; `position` is a checkpoint's `state()`."""

    def __init__(self, cfg: DataConfig, make_loader: Callable[[int, int, Seen], object], world_size: int, step: int,
                 position: dict):
        self.cfg, self.make_loader, self.world = cfg, make_loader, world_size
        self.per_epoch = None if cfg.resampled else epoch_batches(cfg)
        self.epoch, self.taken = position.get("epoch", 0), position.get("batches_in_epoch", 0)
        self.local_batch = cfg.batch_size // world_size
        self.tally = Tally()
        if cfg.resampled:
            self.restart(step)
        elif position.get("world_size", world_size) == world_size:  # rebuild the segment's stream, skip what it gave
            self._segment(position.get("segment_start", 0), Seen(position.get("segment_seen", ())))
        else:  # another number of ranks: a new segment splits what the epoch has not given yet
            self._segment(self.taken, Seen(position["seen"]))

    def _segment(self, start: int, seen: Seen) -> None:
        """This epoch's stream from batch `start` on, which reads none of the `seen` samples."""
        self.start, self.base, self.mine, self.indexed = start, seen, Seen(), True
        loader = self.make_loader(0, self.epoch, seen)
        assert self.per_epoch is not None  # segments exist in epoch mode only
        self.it = islice(only_batches(loader, self.tally), self.taken - start, self.per_epoch - start)

    def restart(self, step: int) -> None:
        """Reseed a resampled stream at `step` (done at every checkpoint, so resumes see the same data)."""
        if self.cfg.resampled:
            self.it = only_batches(self.make_loader(step, self.epoch, Seen()), self.tally)

    def __next__(self) -> Batch:
        if self.per_epoch is not None and self.taken >= self.per_epoch:
            self._next_epoch()
        batch = self._take()
        if batch is None:  # this rank ran short (skipped samples): start the next epoch early
            self._next_epoch()
            batch = self._take()
            if batch is None:
                reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.tally.epoch.items())) or "none"
                raise UserError(f"data.train gave no batch of {self.local_batch} samples on this rank in epochs "
                                f"{self.epoch - 1} and {self.epoch} ({self.tally.shards} shard reads in the last; "
                                f"skipped by reason: {reasons}); check the shards or lower data.batch_size")
        batch["skipped"] = dict(Counter(batch.get("skipped", {})) + self.tally.pending)
        self.tally.pending.clear()
        self.taken += 1
        if self.per_epoch is not None:
            index = batch.get("index")
            indices = [] if index is None else index.tolist()
            self.indexed = self.indexed and bool(indices) and min(indices) >= 0
            self.mine = self.mine.union(Seen.of(indices)) if self.indexed else self.mine
        return batch

    def _take(self) -> Batch | None:
        try:
            return next(self.it, None)
        except RuntimeError as exc:  # torch's DataLoader(timeout=...) says "DataLoader timed out after N seconds"
            if "DataLoader timed out" not in str(exc):
                raise
            raise UserError(f"the data loader's workers gave no batch in data.timeout_s={self.cfg.timeout_s:g} s "
                            f"(a worker hung or a shard read stalled); resume with --resume latest, or raise "
                            f"data.timeout_s if reading data.train is that slow") from None

    def _next_epoch(self) -> None:
        self.epoch, self.taken = self.epoch + 1, 0
        self.tally.epoch, self.tally.shards = Counter(), 0
        self._segment(0, Seen())

    def close(self) -> None:
        """Shut the loader's workers down now (they ignore SIGTERM, so they must not be left to exit handlers)."""
        self.it = iter(())

    def state(self) -> dict:
        """Called on every rank at once (it gathers the epoch's seen samples)."""
        state = {"epoch": self.epoch, "batches_in_epoch": self.taken}
        if self.per_epoch is None:
            return state
        seen = gathered_seen(self.mine if self.indexed else None)
        return {**state, "world_size": self.world, "segment_start": self.start, "segment_seen": self.base.ranges,
                "seen": self.base.union(seen).ranges if seen is not None else None}
