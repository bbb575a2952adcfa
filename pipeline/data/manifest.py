"""Shard-writer input: a CSV/TSV/JSONL/Parquet manifest or a folder with one sub-folder per class.

Both become the same list of `Row`s. Mistakes in the manifest itself (bad key, unknown class
name, duplicate key) stop with a one-line UserError; problems with the media files a row points
to are the writer's business (it skips and counts them).
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

FIELDS = ("image", "text", "audio", "label", "neg_text")
MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl", ".parquet")
# A key becomes the tar member prefix KEY.ext: a dot would move the split between key and extension.
KEY_PATTERN = re.compile(r"^[\w-]+(/[\w-]+)*$")
FOLDER_IMAGE_EXTS = {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"}
FOLDER_AUDIO_EXTS = {"flac", "wav", "mp3", "ogg", "oga", "aif", "aiff"}


@dataclass(frozen=True)
class Row:
    """One sample to write. `image`/`audio` are resolved paths; `source_paths` keeps them as given."""

    index: int
    key: str
    image: Path | None = None
    audio: Path | None = None
    text: tuple[str, ...] = ()
    neg_text: tuple[str, ...] = ()
    label: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    source_paths: dict[str, str] = field(default_factory=dict)


@dataclass
class Source:
    """Rows plus what the input says about itself (class names, zero-shot templates)."""

    path: Path
    rows: list[Row]
    fields: set[str]
    classnames: list[str] | None = None
    templates: list[str] | None = None
    unsupported_files: list[str] = field(default_factory=list)

    @property
    def stem(self) -> str:
        return self.path.name if self.path.is_dir() else self.path.stem


def read_source(path: str | Path, classnames: list[str] | None = None) -> Source:
    """Read a manifest file or a class-folder tree. `classnames` maps string labels to indices."""
    path = Path(path)
    if path.is_dir():
        return _read_folder_tree(path)
    if not path.is_file():
        raise UserError(f"source {path} does not exist: pass a manifest ({', '.join(MANIFEST_SUFFIXES)}) "
                        "or a folder with one sub-folder per class")
    if path.suffix.lower() not in MANIFEST_SUFFIXES:
        raise UserError(f"source {path}: unknown manifest type {path.suffix!r}; use one of "
                        f"{', '.join(MANIFEST_SUFFIXES)} or a class-folder tree")
    records = _read_records(path)
    if not records:
        raise UserError(f"manifest {path} has no rows")
    present = {f for f in FIELDS if any(r.get(f) not in (None, "") for r in records)}
    if not present:
        raise UserError(f"manifest {path} has none of the columns {', '.join(FIELDS)} (found: "
                        f"{', '.join(sorted(records[0]))})")
    names = classnames or _read_lines_beside(path, "classnames.txt")
    labels = _label_mapper(path, records, names)
    rows = [_row_from_record(path, i, r, labels) for i, r in enumerate(records)]
    _check_unique_keys(path, rows)
    if names is None and labels.string_labels:
        names = labels.string_labels
    return Source(path, rows, present, names, _read_lines_beside(path, "zeroshot_classification_templates.txt"))


# ------------------------------------------------------------------------------------ manifests
def _read_records(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    if suffix == ".jsonl":
        records = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"manifest {path} line {n}: invalid JSON ({exc.msg}); fix or remove the line") \
                    from None
            if not isinstance(record, dict):
                raise UserError(f"manifest {path} line {n}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
        return records
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading the Parquet manifest {path} needs pyarrow: pip install pyarrow") from None
    return pq.read_table(path).to_pylist()


def _read_lines_beside(manifest: Path, name: str) -> list[str] | None:
    """CLIP_benchmark's own file names, looked up next to the manifest, so a set's metadata travels with it."""
    found = manifest.parent / name
    if not found.is_file():
        return None
    return [line.strip() for line in found.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_lines(path: str | Path, what: str) -> list[str]:
    """A one-item-per-line file (classnames, templates), with a clear error when it is missing or empty."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file {path} does not exist")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise UserError(f"{what} file {path} is empty: write one entry per line")
    return lines


@dataclass
class _LabelMapper:
    """Labels are ints, or class names mapped to their index in the class list."""

    index: dict[str, int] | None
    string_labels: list[str] | None

    def __call__(self, where: str, value: Any) -> int | None:
        if value is None or value == "":
            return None
        if isinstance(value, bool):
            raise UserError(f"{where}: label {value!r} is not a class index or class name")
        if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
            return int(value)
        text = str(value).strip()
        if re.fullmatch(r"\d+", text):
            return int(text)
        if self.index is None or text not in self.index:
            raise UserError(f"{where}: label {text!r} is not a class index nor one of the class names; "
                            "fix the manifest or pass --classnames FILE")
        return self.index[text]


def _label_mapper(path: Path, records: list[dict], classnames: list[str] | None) -> _LabelMapper:
    strings = {str(r["label"]).strip() for r in records
               if isinstance(r.get("label"), str) and r["label"].strip() and not r["label"].strip().isdigit()}
    if not strings:
        return _LabelMapper(None, None)
    if classnames:
        return _LabelMapper({name: i for i, name in enumerate(classnames)}, None)
    ordered = sorted(strings)  # no class list given: sorted names, like a class-folder tree
    return _LabelMapper({name: i for i, name in enumerate(ordered)}, ordered)


def _lines(value: Any) -> tuple[str, ...]:
    """Captions: a list, or a string with one caption per line. Inner newlines would split a caption."""
    if value is None or value == "":
        return ()
    items = value if isinstance(value, (list, tuple)) else str(value).splitlines()
    return tuple(s for s in (" ".join(str(v).split()) for v in items) if s)


def _resolve(manifest: Path, where: str, value: Any) -> Path | None:
    if value is None or value == "":
        return None
    text = str(value)
    if "://" in text:
        raise UserError(f"{where}: {text} is remote; the shard writer reads local files only, download it first")
    p = Path(text)
    return p if p.is_absolute() else manifest.parent / p


def _row_from_record(manifest: Path, index: int, record: dict, labels: _LabelMapper) -> Row:
    where = f"manifest {manifest} row {index + 1}"
    key = record.get("key")
    key = f"{index:09d}" if key is None or key == "" else str(key)
    if not KEY_PATTERN.match(key):
        raise UserError(f"{where}: key {key!r} may hold only letters, digits, '_', '-' and inner '/' "
                        "(a '.' would break the KEY.ext member names)")
    extra = {k: v for k, v in record.items() if k not in FIELDS and k != "key" and v is not None}
    return Row(
        index=index, key=key,
        image=_resolve(manifest, where, record.get("image")),
        audio=_resolve(manifest, where, record.get("audio")),
        text=_lines(record.get("text")),
        neg_text=_lines(record.get("neg_text")),
        label=labels(where, record.get("label")),
        extra=extra,
        source_paths={m: str(record[m]) for m in ("image", "audio") if record.get(m) not in (None, "")},
    )


def _check_unique_keys(path: Path, rows: list[Row]) -> None:
    first: dict[str, int] = {}
    for row in rows:
        if row.key in first:
            raise UserError(f"manifest {path}: key {row.key!r} appears in rows {first[row.key] + 1} and "
                            f"{row.index + 1}; keys must be unique")
        first[row.key] = row.index


# ---------------------------------------------------------------------------------- folder tree
def _read_folder_tree(root: Path) -> Source:
    """root/CLASS/STEM.{png,jpg,...,flac,wav,...,txt,neg.txt}: files sharing a stem form one sample.

    Class names are the sub-folder names (sorted, '_' read as a space); files at the top level
    are metadata and not samples.
    """
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise UserError(f"source folder {root} has no class sub-folders: put each class's files in root/CLASS/")
    rows, unsupported = [], []
    for label, class_dir in enumerate(class_dirs):
        samples: dict[str, dict[str, Path]] = {}
        for f in sorted(class_dir.rglob("*")):
            if not f.is_file() or f.name.startswith("."):
                continue
            stem, kind = _classify(f)
            if kind is None:
                unsupported.append(str(f.relative_to(root)))
                continue
            samples.setdefault(str(f.relative_to(class_dir).with_name(stem)), {})[kind] = f
        for files in samples.values():
            rows.append(_row_from_files(root, len(rows), label, files))
    if not rows:
        raise UserError(f"source folder {root} holds no image, audio or text files in its class sub-folders")
    present = {"label"} | {f for f in FIELDS if any(getattr(r, f) for r in rows)}
    classnames = [d.name.replace("_", " ") for d in class_dirs]
    return Source(root, rows, present, classnames, None, unsupported)


def _classify(f: Path) -> tuple[str, str | None]:
    name = f.name
    if name.lower().endswith(".neg.txt"):
        return name[: -len(".neg.txt")], "neg_text"
    stem, _, ext = name.rpartition(".")
    ext = ext.lower()
    kind = "image" if ext in FOLDER_IMAGE_EXTS else "audio" if ext in FOLDER_AUDIO_EXTS else \
        "text" if ext == "txt" else None
    return stem, kind


def _row_from_files(root: Path, index: int, label: int, files: dict[str, Path]) -> Row:
    def read_text(kind: str) -> tuple[str, ...]:
        return _lines(files[kind].read_text(encoding="utf-8", errors="replace")) if kind in files else ()

    return Row(index=index, key=f"{index:09d}", image=files.get("image"), audio=files.get("audio"),
               text=read_text("text"), neg_text=read_text("neg_text"), label=label,
               source_paths={k: str(files[k].relative_to(root)) for k in ("image", "audio") if k in files})
