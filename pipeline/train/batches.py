"""Training batches across restarts: where the data stream is, so a resumed run continues it exactly.

Resampled streams are infinite and reseeded by step at every (re)start, so the batches after a
checkpoint are a function of the step alone. Epoch streams read each shard once per epoch; every
rank takes the same number of batches per epoch (epoch size // global batch, so collectives stay
in step) and the position (epoch, batches taken) is checkpointed and restored by skipping.
"""
from __future__ import annotations

from itertools import islice
from typing import Callable

from pipeline.config import DataConfig
from pipeline.data.sources import expand_spec, shard_sizes
from pipeline.errors import UserError


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


class BatchStream:
    def __init__(self, cfg: DataConfig, make_loader: Callable[[int, int], object], step: int, epoch: int = 0,
                 taken: int = 0):
        self.cfg, self.make_loader = cfg, make_loader
        self.per_epoch = None if cfg.resampled else epoch_batches(cfg)
        self.epoch, self.taken = epoch, taken
        if cfg.resampled:
            self.restart(step)
        else:  # an epoch's stream does not depend on the step: rebuild it and skip what was taken
            self.it = islice(iter(make_loader(0, epoch)), taken, self.per_epoch)

    def restart(self, step: int) -> None:
        """Reseed a resampled stream at `step` (done at every checkpoint, so resumes see the same data)."""
        if self.cfg.resampled:
            self.it = iter(self.make_loader(step, self.epoch))

    def __next__(self) -> dict:
        if self.per_epoch is not None and self.taken >= self.per_epoch:
            self._next_epoch()
        try:
            batch = next(self.it)
        except StopIteration:  # this rank ran short (skipped samples): start the next epoch early
            self._next_epoch()
            batch = next(self.it)
        self.taken += 1
        return batch

    def _next_epoch(self) -> None:
        self.epoch, self.taken = self.epoch + 1, 0
        self.it = islice(iter(self.make_loader(0, self.epoch)), self.per_epoch)

    def state(self) -> dict:
        return {"epoch": self.epoch, "batches_in_epoch": self.taken}
