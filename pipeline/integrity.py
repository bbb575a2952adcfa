"""File manifests: a checkpoint is trusted only when every file it lists has its recorded size and CRC32.

A kill, a full disk or a truncated copy can leave files that exist but are incomplete; a manifest
written last (after every file is hashed right after it was written) turns "the file exists" into
"the file is what was saved". CRC32 (zlib) is used for speed: it detects truncation and damage,
not tampering.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Callable, Iterable, Optional

MANIFEST = "manifest.json"
BLOCK = 1 << 24


def file_record(path: Path) -> dict:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(BLOCK):
            crc = zlib.crc32(chunk, crc)
    return {"size": path.stat().st_size, "crc32": f"{crc:08x}"}


def hash_files(folder: Path, names: Iterable[str]) -> dict[str, dict]:
    return {name: file_record(folder / name) for name in sorted(names)}


def write_manifest(folder: Path, records: dict[str, dict]) -> None:
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"files": records}, indent=1, sort_keys=True))
    tmp.replace(folder / MANIFEST)


def verify(folder: Path) -> Optional[str]:
    """None if every listed file matches its record; else why not, in a few words naming the file."""
    try:
        records = json.loads((folder / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (the save did not finish)"
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} is damaged"
    for name, want in records.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{name} has {size} bytes, {want['size']} were saved"
        if file_record(path)["crc32"] != want["crc32"]:
            return f"{name} does not match its checksum"
    return None


def newest_verified(candidates: list[Path], announce: Callable[[str], None] = print) -> Optional[Path]:
    """The newest of `candidates` (oldest first) whose manifest verifies; each one passed over is announced."""
    for folder in reversed(candidates):
        reason = verify(folder)
        if reason is None:
            return folder
        announce(f"note: skipping checkpoint {folder}: {reason}")
    return None
