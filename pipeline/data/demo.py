"""Demo shard sets, built with the shard writer from the raw data committed in data/.

`python -m pipeline.data.demo` (run by `make demo`) needs nothing but the repository: the PNGs are
unpacked from data/fashion_mnist/images.tar.gz (one archive keeps a clone small) next to the
manifests that point at them. Reruns keep every finished shard, so they take a moment.

Output under OUT (default data/shards):
  demo/train/train-00000{0..5}.tar, demo/val/val-000000.tar   image + caption + speech + label + negatives
  demo/wds/fashion_mnist             CLIP_benchmark classification (image, .cls)
  demo/wds/fashion_mnist_retrieval   CLIP_benchmark retrieval (image, six captions per image)
  demo/wds/fashion_mnist_audio       spoken class names with .cls (held-out voices)
  symile/train, symile/val           Symile-M3-style: image + speech in a language + class name in it
  symile/wds/fashion_mnist_symile    classification of the 50 (class, language) texts; template "{c}"
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.data.writer import WriteReport, write_shards
from pipeline.errors import UserError

REPO_DATA = Path(__file__).resolve().parents[2] / "data"
TRAIN_SHARD_SIZE = 500


@dataclass(frozen=True)
class DemoSet:
    out: str  # folder under the output root
    manifest: str  # relative to data/
    options: dict = field(default_factory=dict)  # write_shards keywords


DEMO_SETS = [
    DemoSet("demo/train", "fashion_mnist/train.jsonl", {"prefix": "train", "maxcount": TRAIN_SHARD_SIZE}),
    DemoSet("demo/val", "fashion_mnist/val.jsonl", {"prefix": "val", "maxcount": TRAIN_SHARD_SIZE}),
    DemoSet("demo/wds/fashion_mnist", "fashion_mnist/test.jsonl",
            {"layout": "clip_benchmark", "task": "classification", "fields": ["image", "label"]}),
    DemoSet("demo/wds/fashion_mnist_retrieval", "fashion_mnist/test.jsonl",
            {"layout": "clip_benchmark", "task": "retrieval", "fields": ["image", "text"]}),
    DemoSet("demo/wds/fashion_mnist_audio", "fashion_mnist/test.jsonl",
            {"layout": "clip_benchmark", "task": "classification", "fields": ["audio", "label"]}),
    DemoSet("symile/train", "symile/train.jsonl", {"prefix": "train", "maxcount": TRAIN_SHARD_SIZE}),
    DemoSet("symile/val", "symile/val.jsonl", {"prefix": "val", "maxcount": TRAIN_SHARD_SIZE}),
    DemoSet("symile/wds/fashion_mnist_symile", "symile/test.jsonl",
            {"layout": "clip_benchmark", "task": "classification", "fields": ["image", "audio", "text", "label"]}),
]


def build_demo_shards(out_root: str | Path = "data/shards", *, force: bool = False, data_root: str | Path = REPO_DATA,
                      progress: bool = True) -> dict[str, WriteReport]:
    """Build every demo set (see the module docstring); `force` rebuilds from scratch."""
    data_root, out_root = Path(data_root), Path(out_root)
    unpack_images(data_root)
    reports = {}
    for demo in DEMO_SETS:
        target = out_root / demo.out
        if force and target.exists():
            shutil.rmtree(target)
        reports[demo.out] = write_shards(data_root / demo.manifest, target, progress=progress, **demo.options)
    return reports


def unpack_images(data_root: Path) -> Path:
    """Unpack images.tar.gz into fashion_mnist/images/ unless that copy is already current."""
    archive = data_root / "fashion_mnist" / "images.tar.gz"
    if not archive.is_file():
        raise UserError(f"demo data {archive} is missing: run from a clone of the repository "
                        "(or rebuild it with data/build_demo.py)")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    target = archive.parent / "images"
    stamp = target / ".unpacked-from"
    if stamp.is_file() and stamp.read_text() == digest:
        return target
    tmp = Path(tempfile.mkdtemp(dir=archive.parent, prefix=".images-"))
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")  # "data" refuses absolute paths, links out, devices
        (tmp / ".unpacked-from").write_text(digest)
        shutil.rmtree(target, ignore_errors=True)
        try:
            tmp.rename(target)
        except OSError:  # a concurrent build finished first; its copy is the same
            if not (stamp.is_file() and stamp.read_text() == digest):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.data.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/shards", help="output root (data/shards)")
    parser.add_argument("--force", action="store_true", help="delete and rebuild every set")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        reports = build_demo_shards(args.out, force=args.force, progress=not args.no_progress)
    except UserError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2
    for name, report in reports.items():
        print(f"{name}: {report.summary()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
