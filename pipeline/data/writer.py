"""Shard writer: a manifest or class-folder tree in, WebDataset tars out (`mmclip shards`).

Two layouts:
- "webdataset": img2dataset-style `PREFIX-000000.tar` with KEY.png|jpg|webp, KEY.txt (captions, one
  per line), KEY.json (caption/text, label, source paths, extra manifest columns), KEY.flac|wav|...,
  KEY.cls, KEY.neg.txt (hard-negative captions, one per line), plus `sizes.json`.
- "clip_benchmark": CLIP_benchmark's local `wds/` layout for eval sets: OUT/SPLIT/0.tar..N-1.tar,
  OUT/SPLIT/nshards.txt, OUT/classnames.txt + OUT/zeroshot_classification_templates.txt
  (classification, KEY.cls) or OUT/dataset_type.txt = "retrieval" (KEY.txt = captions).

Shards are fixed row ranges planned up front, so a rerun knows which shard holds which rows:
each finished shard is renamed into place and followed by a `NAME_stats.json` with a
fingerprint of its rows; a rerun keeps every shard whose fingerprint still matches and writes
only the rest. Unreadable inputs (missing or corrupt files) are skipped, counted per reason and
listed in the stats files and the report.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import soundfile
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from pipeline.data.manifest import FIELDS, Row, Source, read_lines, read_source
from pipeline.errors import UserError

LAYOUTS = ("webdataset", "clip_benchmark")
TASKS = ("auto", "classification", "retrieval")
# What readers (ours, open_clip, CLIP_benchmark) decode; other formats are re-encoded.
IMAGE_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
AUDIO_FORMATS = {"FLAC": "flac", "WAV": "wav", "OGG": "ogg", "MP3": "mp3"}
DEFAULT_TEMPLATES = ["a photo of a {c}."]
TAR_MEMBER_OVERHEAD = 1024  # header block + average padding, for planning shard sizes
TAR_MTIME = 0  # fixed member mtime: the same rows give byte-identical shards


@dataclass(frozen=True)
class Skipped:
    """One input row (or file) that was not written, and why."""

    key: str
    reason: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"key": self.key, "reason": self.reason, "detail": self.detail}


@dataclass
class WriteReport:
    out_dir: Path
    layout: str
    shards: list[str]  # paths relative to out_dir, in order
    written: list[str]  # written by this call
    kept: list[str]  # complete from an earlier call, left untouched
    samples: int  # samples in all shards
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def skipped_by_reason(self) -> dict[str, int]:
        return dict(Counter(s.reason for s in self.skipped))

    def summary(self) -> str:
        lines = [f"{self.samples} samples in {len(self.shards)} shard(s) under {self.out_dir} ({self.layout} layout; "
                 f"{len(self.written)} written, {len(self.kept)} kept from an earlier run)"]
        if self.skipped:
            reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.skipped_by_reason.items()))
            lines.append(f"skipped {len(self.skipped)} inputs: {reasons}")
            lines += [f"  {s.key}: {s.reason} ({s.detail})" for s in self.skipped[:10]]
            if len(self.skipped) > 10:
                lines.append(f"  ... {len(self.skipped) - 10} more in the *_stats.json files")
        return "\n".join(lines)


class SkipSample(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


# ----------------------------------------------------------------------------------- public API
def write_shards(source: str | Path | Source, out_dir: str | Path, *, layout: str = "webdataset",
                 maxcount: int = 10_000, maxsize: int = 1_000_000_000, prefix: str | None = None,
                 fields: Sequence[str] | None = None, task: str = "auto", split: str = "test",
                 classnames: Sequence[str] | None = None, templates: Sequence[str] | None = None,
                 progress: bool = True) -> WriteReport:
    """Write `source` (manifest path, class-folder path, or a read Source) as shards under `out_dir`.

    `fields` limits the written columns (default: all the source has). For the clip_benchmark
    layout, `task` (auto: classification if there are labels), `split`, `classnames` (default: the
    source's) and `templates` (default: the source's, else "a photo of a {c}.") describe the set.
    """
    if layout not in LAYOUTS:
        raise UserError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    if maxcount < 1 or maxsize < 1:
        raise UserError(f"maxcount ({maxcount}) and maxsize ({maxsize}) must be positive")
    src = source if isinstance(source, Source) else read_source(source, list(classnames) if classnames else None)
    chosen = _choose_fields(src, fields)
    out = Path(out_dir)
    if layout == "clip_benchmark":
        if prefix is not None:
            raise UserError("--prefix applies to the webdataset layout; clip_benchmark shards are named 0.tar..N-1.tar")
        bench = _BenchmarkSet.describe(src, chosen, task, classnames, templates)
        shard_dir, names = out / split, "{index}.tar"
    else:
        bench, shard_dir, names = None, out, f"{prefix or src.stem}-{{index:06d}}.tar"
    encoder = _SampleEncoder(layout, chosen, bench.required if bench else (), src.classnames)
    report = WriteReport(out, layout, [], [], [], 0,
                         [Skipped(f, "unsupported_file", "not an image, audio or text file")
                          for f in src.unsupported_files])
    _write_planned(src, shard_dir, names, encoder, plan_shards(src.rows, maxcount, maxsize), report, progress)
    if bench:
        bench.write_metadata(out, shard_dir, len(report.shards))
    return report


def add_shards_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="manifest (.csv .tsv .jsonl .parquet) with columns image, text, audio, "
                        "label, neg_text, key (any subset; paths relative to the manifest), or a folder with one "
                        "sub-folder per class")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created; reruns resume)")
    parser.add_argument("--layout", choices=LAYOUTS, default="webdataset",
                        help="webdataset: img2dataset-style PREFIX-000000.tar + sizes.json (training); "
                        "clip_benchmark: CLIP_benchmark's wds/ layout DIR/SPLIT/{0..N-1}.tar (eval sets)")
    parser.add_argument("--maxcount", type=int, default=10_000, metavar="N", help="samples per shard (10000)")
    parser.add_argument("--maxsize", type=_parse_bytes, default=1_000_000_000, metavar="BYTES",
                        help="bytes per shard, e.g. 500M or 2G (1G)")
    parser.add_argument("--prefix", default=None, help="shard name prefix (webdataset layout; default: the "
                        "manifest's or folder's name)")
    parser.add_argument("--fields", default=None, metavar="F1,F2",
                        help=f"write only these columns, from {', '.join(FIELDS)} (default: all present)")
    parser.add_argument("--task", choices=TASKS, default="auto", help="clip_benchmark set type (auto: "
                        "classification when there are labels, else retrieval)")
    parser.add_argument("--split", default="test", help="clip_benchmark split folder (test)")
    parser.add_argument("--classnames", metavar="FILE", default=None, help="class names, one per line (default: "
                        "classnames.txt next to the manifest, the class folder names, or the sorted string labels)")
    parser.add_argument("--templates", metavar="FILE", default=None, help="zero-shot templates with {c}, one per "
                        "line (default: zeroshot_classification_templates.txt next to the manifest, else "
                        "'a photo of a {c}.')")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_shards(args: argparse.Namespace) -> int:
    report = write_shards(
        args.source, args.out, layout=args.layout, maxcount=args.maxcount, maxsize=args.maxsize,
        prefix=args.prefix, fields=args.fields.split(",") if args.fields else None, task=args.task,
        split=args.split, classnames=read_lines(args.classnames, "classnames") if args.classnames else None,
        templates=read_lines(args.templates, "templates") if args.templates else None,
        progress=not args.no_progress)
    print(report.summary())
    return 0


def _parse_bytes(text: str) -> int:
    units = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    t = text.strip().upper().removesuffix("B")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size in bytes (e.g. 500000000, 500M, 2G)") from None


def _choose_fields(src: Source, fields: Sequence[str] | None) -> tuple[str, ...]:
    if fields is None:
        return tuple(f for f in FIELDS if f in src.fields)
    unknown = [f for f in fields if f not in FIELDS]
    if unknown:
        raise UserError(f"unknown field(s) {', '.join(unknown)}: choose from {', '.join(FIELDS)}")
    absent = [f for f in fields if f not in src.fields]
    if absent:
        raise UserError(f"source {src.path} has no {', '.join(absent)} column (it has {', '.join(sorted(src.fields))})")
    return tuple(f for f in FIELDS if f in fields)


# ------------------------------------------------------------------------------ CLIP_benchmark
@dataclass
class _BenchmarkSet:
    """What CLIP_benchmark's wds loader reads besides the tars, and which members each row needs."""

    task: str
    classnames: list[str] | None
    templates: list[str] | None
    required: tuple[str, ...]

    @classmethod
    def describe(cls, src: Source, chosen: tuple[str, ...], task: str, classnames, templates) -> _BenchmarkSet:
        if task not in TASKS:
            raise UserError(f"task {task!r} is not one of {', '.join(TASKS)}")
        if task == "auto":
            task = "classification" if "label" in chosen else "retrieval"
        if task == "retrieval":
            if "text" not in chosen:
                raise UserError(f"a retrieval set needs captions: source {src.path} has no text column")
            return cls(task, None, None, ("text",))
        if "label" not in chosen:
            raise UserError(f"a classification set needs labels: source {src.path} has no label column")
        names = list(classnames or src.classnames or [])
        if not names:
            raise UserError(f"no class names for {src.path}: pass --classnames FILE (one per line) or put "
                            "classnames.txt next to the manifest")
        top = max((r.label for r in src.rows if r.label is not None), default=-1)
        if top >= len(names):
            raise UserError(f"source {src.path} has label {top} but only {len(names)} class names")
        temps = list(templates or src.templates or DEFAULT_TEMPLATES)
        bad = [t for t in temps if "{c}" not in t]
        if bad:
            raise UserError(f"zero-shot template {bad[0]!r} has no {{c}} placeholder for the class name")
        return cls(task, names, temps, ("label",))

    def write_metadata(self, root: Path, shard_dir: Path, nshards: int) -> None:
        _atomic_write(shard_dir / "nshards.txt", f"{nshards}\n")
        if self.task == "retrieval":
            _atomic_write(root / "dataset_type.txt", "retrieval\n")
            return
        (root / "dataset_type.txt").unlink(missing_ok=True)  # absent means classification
        assert self.classnames is not None and self.templates is not None  # `describe` sets both for classification
        _atomic_write(root / "classnames.txt", "".join(n + "\n" for n in self.classnames))
        _atomic_write(root / "zeroshot_classification_templates.txt", "".join(t + "\n" for t in self.templates))


# ------------------------------------------------------------------------------------ samples
class _SampleEncoder:
    """Turns a Row into tar members, checking that every file decodes; raises SkipSample otherwise."""

    def __init__(self, layout: str, fields: tuple[str, ...], required: tuple[str, ...],
                 classnames: list[str] | None):
        self.layout, self.fields, self.required, self.classnames = layout, fields, required, classnames
        self._audio_checked: dict[Path, tuple[str, bytes, dict]] = {}  # demo sets reuse few clips

    def fingerprint(self) -> str:
        return json.dumps([self.layout, self.fields, self.required, self.classnames])

    def encode(self, row: Row) -> dict[str, Any]:
        sample: dict[str, Any] = {"__key__": row.key}
        meta: dict[str, Any] = {"key": row.key}
        if "image" in self.fields and row.image is not None:
            ext, data, info = self._image(row.image)
            sample[ext] = data
            meta.update(image=row.source_paths.get("image", str(row.image)), **info)
        if "audio" in self.fields and row.audio is not None:
            ext, data, info = self._audio(row.audio)
            sample[ext] = data
            meta.update(audio=row.source_paths.get("audio", str(row.audio)), **info)
        if "text" in self.fields and row.text:
            sample["txt"] = "\n".join(row.text)
            meta.update(caption=row.text[0], text=row.text[0])
        if "label" in self.fields and row.label is not None:
            sample["cls"] = row.label
            meta["label"] = row.label
            if self.classnames and row.label < len(self.classnames):
                meta["classname"] = self.classnames[row.label]
        if "neg_text" in self.fields and row.neg_text and self.layout == "webdataset":
            sample["neg.txt"] = "\n".join(row.neg_text)
        self._check_complete(row, sample)
        if self.layout == "webdataset":
            sample["json"] = json.dumps({**row.extra, **meta}, ensure_ascii=False, default=str)
        return sample

    def _check_complete(self, row: Row, sample: dict[str, Any]) -> None:
        if len(sample) == 1:
            raise SkipSample("empty_row", "no image, audio, text or label to write")
        if "text" in self.required and "txt" not in sample:
            raise SkipSample("incomplete_row", "a retrieval set needs captions")
        if "label" in self.required and "cls" not in sample:
            raise SkipSample("incomplete_row", "a classification set needs a label")
        if self.required and not any(ext in sample for ext in (*IMAGE_FORMATS.values(), *AUDIO_FORMATS.values())):
            raise SkipSample("incomplete_row", "an eval set needs an image or audio per sample")

    @staticmethod
    def _read(path: Path) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise SkipSample("missing_file", f"{path}: {exc.strerror or exc}") from None

    def _image(self, path: Path) -> tuple[str, bytes, dict]:
        data = self._read(path)
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                fmt, size = im.format, im.size
                if fmt not in IMAGE_FORMATS:  # e.g. BMP/TIFF: readers decode only jpg/png/webp
                    buf = io.BytesIO()
                    im.save(buf, format="PNG")
                    data, fmt = buf.getvalue(), "PNG"
        except Exception as exc:  # PIL raises many types for bad bytes
            raise SkipSample("corrupt_image", f"{path}: {exc}") from None
        return IMAGE_FORMATS[fmt], data, {"width": size[0], "height": size[1]}

    def _audio(self, path: Path) -> tuple[str, bytes, dict]:
        if path not in self._audio_checked:
            data = self._read(path)
            try:
                audio, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
                fmt = soundfile.info(io.BytesIO(data)).format
            except Exception as exc:  # libsndfile errors, truncated streams
                raise SkipSample("corrupt_audio", f"{path}: {exc}") from None
            if not len(audio):
                raise SkipSample("corrupt_audio", f"{path}: no audio frames")
            if fmt not in AUDIO_FORMATS:  # e.g. AIFF: store as FLAC, which every reader decodes
                buf = io.BytesIO()
                soundfile.write(buf, audio, rate, format="FLAC")
                data, fmt = buf.getvalue(), "FLAC"
            info = {"sample_rate": rate, "duration": round(len(audio) / rate, 4), "channels": audio.shape[1]}
            self._audio_checked[path] = (AUDIO_FORMATS[fmt], data, info)
        return self._audio_checked[path]


# -------------------------------------------------------------------------------- shard plan
def plan_shards(rows: Sequence[Row], maxcount: int, maxsize: int) -> list[range]:
    """Consecutive row ranges with at most `maxcount` rows and about `maxsize` bytes each.

    Sizes are estimated from file sizes on disk, so the plan is known before anything is
    written and is the same on every rerun with the same inputs.
    """
    plan, start, size = [], 0, 0
    for i, row in enumerate(rows):
        est = _estimated_bytes(row)
        if i > start and (i - start >= maxcount or size + est > maxsize):
            plan.append(range(start, i))
            start, size = i, 0
        size += est
    if rows:
        plan.append(range(start, len(rows)))
    return plan


def _file_size(path: Path | None) -> int:
    try:
        return path.stat().st_size if path else 0
    except OSError:
        return 0


def _estimated_bytes(row: Row) -> int:
    text = sum(len(t) for t in row.text + row.neg_text)
    return _file_size(row.image) + _file_size(row.audio) + text + 5 * TAR_MEMBER_OVERHEAD


def _rows_fingerprint(rows: Sequence[Row], encoder: _SampleEncoder) -> str:
    """What a shard's bytes depend on: its rows (with file sizes) and the encoding settings."""
    h = hashlib.sha256(encoder.fingerprint().encode())
    for r in rows:
        h.update(json.dumps([r.key, str(r.image), _file_size(r.image), str(r.audio), _file_size(r.audio),
                             r.text, r.neg_text, r.label, r.extra], default=str).encode())
    return h.hexdigest()


def _stats_path(shard: Path) -> Path:
    return shard.with_name(shard.name.removesuffix(".tar") + "_stats.json")


def _load_stats(shard: Path, fingerprint: str) -> dict | None:
    """The stats of a finished shard, or None when it must be (re)written."""
    stats = _stats_path(shard)
    if not shard.is_file() or not stats.is_file():
        return None
    try:
        data = json.loads(stats.read_text())
    except json.JSONDecodeError:
        return None
    return data if data.get("fingerprint") == fingerprint else None


def _write_planned(src: Source, shard_dir: Path, names: str, encoder: _SampleEncoder, plan: list[range],
                   report: WriteReport, progress: bool) -> None:
    """Write or keep each planned shard, filling `report`; then tidy the folder and sizes.json."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    shard_names = [names.format(index=i) for i in range(len(plan))]
    sizes = {}
    show = progress and not os.environ.get("MMCLIP_NO_PROGRESS")
    with tqdm(total=len(src.rows), unit="sample", desc=f"shards -> {shard_dir}", disable=not show) as bar:
        for name, rows in zip(shard_names, plan, strict=True):
            shard = shard_dir / name
            rel = str(shard.relative_to(report.out_dir))
            shard_rows = [src.rows[i] for i in rows]
            fingerprint = _rows_fingerprint(shard_rows, encoder)
            stats = _load_stats(shard, fingerprint)
            if stats is None:
                stats = _write_one(shard, shard_rows, encoder, fingerprint, bar)
                report.written.append(rel)
            else:
                report.kept.append(rel)
                bar.update(len(shard_rows))
            report.shards.append(rel)
            sizes[name] = stats["count"]
            report.samples += stats["count"]
            report.skipped += [Skipped(**s) for s in stats["skipped"]]
            bar.set_postfix(skipped=len(report.skipped))
    _remove_stale(shard_dir, names, set(shard_names))
    _update_sizes(shard_dir, names, sizes)


def _write_one(shard: Path, rows: list[Row], encoder: _SampleEncoder, fingerprint: str, bar) -> dict:
    """Write to NAME.partial and rename, then the stats: a shard with stats is complete."""
    partial = shard.with_name(shard.name + ".partial")
    count, skipped = 0, []
    with open(partial, "wb") as f, wds.TarWriter(f, mtime=TAR_MTIME) as tar:
        for row in rows:
            try:
                tar.write(encoder.encode(row))
                count += 1
            except SkipSample as skip:
                skipped.append(Skipped(row.key, skip.reason, skip.detail).as_dict())
            bar.update(1)
    os.replace(partial, shard)
    stats = {"shard": shard.name, "rows": [rows[0].index, rows[-1].index + 1], "count": count,
             "skipped": skipped, "fingerprint": fingerprint}
    _atomic_write(_stats_path(shard), json.dumps(stats, indent=1) + "\n")
    return stats


def _matches(name: str, pattern: str) -> bool:
    """Does a file name follow this writer's shard naming (so it is ours to replace)?"""
    head, _, tail = pattern.partition("{index")
    tail = tail.partition("}")[2]
    middle = name[len(head): len(name) - len(tail)]
    return name.startswith(head) and name.endswith(tail) and middle.isdigit()


def _remove_stale(shard_dir: Path, names: str, current: set[str]) -> None:
    """Shards of an earlier, longer plan would be picked up by brace patterns: remove them."""
    for stats in shard_dir.glob("*_stats.json"):
        name = stats.name.removesuffix("_stats.json") + ".tar"
        if _matches(name, names) and name not in current:
            (shard_dir / name).unlink(missing_ok=True)
            stats.unlink()
    for partial in shard_dir.glob("*.tar.partial"):
        if _matches(partial.name.removesuffix(".partial"), names):
            partial.unlink()


def _update_sizes(shard_dir: Path, names: str, sizes: dict[str, int]) -> None:
    """sizes.json: shard -> samples. Entries of other prefixes sharing the folder are kept."""
    path = shard_dir / "sizes.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    merged = {k: v for k, v in old.items() if not _matches(k, names)} | sizes
    _atomic_write(path, json.dumps(merged, indent=1) + "\n")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
