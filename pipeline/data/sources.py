"""Shard specs: brace expansion, several sources joined with '::', weights, sizes, and which shards a
(rank, worker) reads in each mode.

Resampled mode draws shards with replacement, by source weight, from a generator seeded by
(seed, rank, worker, start step): infinite, reproducible, and a resumed run at step S draws what
an uninterrupted run restarted at S draws. Epoch mode gives every shard to exactly one
(rank, worker) per epoch, after a shuffle that depends only on (seed, epoch).
"""
from __future__ import annotations

import glob
import json
import random
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


def epoch_urls(sources: list[Source], seed: int, epoch: int, rank: int, world: int, worker: int,
               workers: int) -> list[str]:
    urls = [u for s in sources for u in s.urls]
    random.Random(f"{seed}/epoch{epoch}").shuffle(urls)
    return urls[rank::world][worker::workers]
