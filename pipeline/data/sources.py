"""Shard specs: brace expansion, several sources joined with '::', weights, sizes, and which shards a
(rank, worker) reads in each mode.

Resampled mode draws shards with replacement, by source weight, from a generator seeded by
(seed, rank, worker, start step): infinite, reproducible, and a resumed run at step S draws what
an uninterrupted run restarted at S draws. Epoch mode shuffles the shards by (seed, epoch) alone.
When every shard's sample count is known, each (rank, worker) then reads one contiguous run of
the epoch's samples not yet seen (`epoch_share`), so the epoch can be split again over another
number of ranks mid-way; otherwise each shard goes to exactly one (rank, worker).
"""
from __future__ import annotations

import glob
import json
import random
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import braceexpand

from pipeline.errors import UserError

REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "hf://")


@dataclass
class Source:
    urls: list[str]
    weight: float = 1.0


def is_remote(url: str) -> bool:
    return url.startswith(REMOTE_PREFIXES)


def expand_spec(spec: str, weights: Optional[list[float]] = None, key: str = "data.train") -> list[Source]:
    """'a-{000..009}.tar::b/*.tar' -> sources; local shards must exist (fail now, not mid-run)."""
    parts = [p.strip() for p in spec.split("::") if p.strip()]
    if not parts:
        raise UserError(f"{key} is empty; give a shard spec such as shards/train-{{000000..000099}}.tar")
    if weights is not None and len(weights) != len(parts):
        raise UserError(f"{key} has {len(parts)} sources but {len(weights)} weights")
    sources = []
    for i, part in enumerate(parts):
        urls = []
        for url in braceexpand.braceexpand(part):
            if is_remote(url):
                urls.append(url)
            elif any(ch in url for ch in "*?["):
                urls.extend(sorted(glob.glob(url)))
            else:
                urls.append(url)
        local_missing = [u for u in urls if not is_remote(u) and not Path(u).is_file()]
        if not urls or len(local_missing) == len(urls):
            raise UserError(f"no shards match {part!r} ({key}); check the path and the brace range")
        if local_missing:
            raise UserError(f"{key}: {len(local_missing)} of {len(urls)} shards in {part!r} do not exist, "
                            f"e.g. {local_missing[0]}")
        sources.append(Source(urls, 1.0 if weights is None else float(weights[i])))
    return sources


def shard_sizes(urls: list[str]) -> dict[str, int]:
    """Samples per shard from sizes.json or img2dataset's NAME_stats.json next to local shards."""
    sizes: dict[str, int] = {}
    for folder in {str(Path(u).parent) for u in urls if not is_remote(u)}:
        f = Path(folder) / "sizes.json"
        if f.is_file():
            for name, n in json.loads(f.read_text()).items():
                sizes[str(Path(folder) / name)] = int(n)
    for u in urls:
        if u not in sizes and not is_remote(u):
            stats = Path(u).with_name(Path(u).stem + "_stats.json")
            if stats.is_file():
                sizes[u] = int(json.loads(stats.read_text()).get("successes", 0))
    return sizes


def resampled_urls(sources: list[Source], seed: int, rank: int, worker: int, start_step: int) -> Iterator[str]:
    rng = random.Random(f"{seed}/{rank}/{worker}/{start_step}")
    weights = [s.weight for s in sources]
    while True:
        source = rng.choices(sources, weights)[0]
        yield rng.choice(source.urls)


def epoch_order(sources: list[Source], seed: int, epoch: int) -> list[str]:
    urls = [u for s in sources for u in s.urls]
    random.Random(f"{seed}/epoch{epoch}").shuffle(urls)
    return urls


def epoch_urls(sources: list[Source], seed: int, epoch: int, rank: int, world: int, worker: int,
               workers: int) -> list[str]:
    return epoch_order(sources, seed, epoch)[rank::world][worker::workers]


class Seen:
    """Global sample indices an epoch has already given, as sorted disjoint [start, end) ranges: small,
    because whole shards are consumed in order and only a shuffle buffer's reach is scattered."""

    def __init__(self, ranges=()):
        self.ranges = [(int(a), int(b)) for a, b in ranges]
        self._starts = [a for a, _ in self.ranges]

    @classmethod
    def of(cls, indices) -> "Seen":
        ranges: list[list[int]] = []
        for i in sorted(set(indices)):
            if ranges and ranges[-1][1] == i:
                ranges[-1][1] = i + 1
            else:
                ranges.append([i, i + 1])
        return cls(ranges)

    def union(self, other: "Seen") -> "Seen":
        merged: list[list[int]] = []
        for a, b in sorted(self.ranges + other.ranges):
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        return Seen(merged)

    def __contains__(self, index: int) -> bool:
        at = bisect_right(self._starts, index) - 1
        return at >= 0 and index < self.ranges[at][1]

    def count(self, start: int, end: int) -> int:
        """How many of the indices in [start, end) were seen (only the ranges that overlap are visited)."""
        lo, hi = max(bisect_right(self._starts, start) - 1, 0), bisect_left(self._starts, end)
        return sum(max(0, min(b, end) - max(a, start)) for a, b in self.ranges[lo:hi])

    def __len__(self) -> int:
        return sum(b - a for a, b in self.ranges)


def epoch_share(order: list[str], sizes: dict[str, int], offsets: dict[str, int], seen: Seen, rank: int,
                world: int, worker: int, workers: int, batch: int) -> dict[str, range]:
    """url -> positions among that shard's unseen samples that this (rank, worker) reads this epoch.

    The unseen samples, in shard order, are cut into `world` near-equal contiguous runs (so every rank
    has as many full batches as any other, give or take one), and a rank's run into whole batches per
    worker, batch j going to worker j % workers (the order a DataLoader takes them in)."""
    left = [sizes[u] - seen.count(offsets[u], offsets[u] + sizes[u]) for u in order]
    total = sum(left)
    start, end = rank * total // world, (rank + 1) * total // world
    full = (end - start) // batch
    before = sum(len(range(w, full, workers)) for w in range(worker))
    start, end = start + before * batch, (end if worker == workers - 1 else
                                          start + (before + len(range(worker, full, workers))) * batch)
    share, at = {}, 0
    for url, n in zip(order, left):
        first, stop = max(start - at, 0), min(end - at, n)
        if first < stop:
            share[url] = range(first, stop)
        at += n
    return share
