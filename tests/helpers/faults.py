"""Seeded damage for WebDataset shards: the fault-injection suite's generator (tests/system/test_faults.py).

Each case takes a small, valid shard and damages it one way: byte flips, truncation at a random
offset, a zero-length member, a duplicated key, or a member whose header declares a huge size.
"""
from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

KINDS = ("byte_flips", "truncate", "zero_length_member", "duplicate_key", "huge_declared_size")


def small_shard(source: Path, out: Path, samples: int) -> int:
    """The first `samples` samples of `source` as a new shard (members in order); returns the sample count."""
    keys = []
    with tarfile.open(source) as src, tarfile.open(out, "w") as dst:
        for member in src:
            key = member.name.split(".", 1)[0]
            if key not in keys:
                if len(keys) == samples:
                    break
                keys.append(key)
            dst.addfile(member, src.extractfile(member))
    (out.parent / "sizes.json").write_text(json.dumps({out.name: len(keys)}))
    return len(keys)


def _members(data: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar]


def _pack(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, payload in members:
            info = tarfile.TarInfo(info.name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def damage(data: bytes, kind: str, rng: random.Random) -> bytes:
    if kind == "byte_flips":
        out = bytearray(data)
        for _ in range(rng.randint(1, 20)):
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        return bytes(out)
    if kind == "truncate":
        return data[: rng.randrange(len(data))]
    members = _members(data)
    i = rng.randrange(len(members))
    if kind == "zero_length_member":
        members[i] = (members[i][0], b"")
        return _pack(members)
    if kind == "duplicate_key":
        members.insert(i + 1, members[i])
        return _pack(members)
    if kind == "huge_declared_size":
        packed = _pack(members)
        header = 512 * sum(1 + (len(p) + 511) // 512 for _, p in members[:i])  # offset of member i's header
        block = bytearray(packed[header:header + 512])
        block[124:136] = b"%011o\0" % (8 << 30)  # 8 GiB
        block[148:156] = b" " * 8
        block[148:156] = b"%06o\0 " % sum(block)
        return packed[:header] + bytes(block) + packed[header + 512:]
    raise ValueError(kind)


def cases(n: int, seed: int = 0) -> list[tuple[int, str]]:
    """(case seed, damage kind) pairs, every kind equally often."""
    rng = random.Random(seed)
    return [(rng.randrange(2**31), KINDS[i % len(KINDS)]) for i in range(n)]
