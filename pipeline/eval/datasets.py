"""Evaluation sets: CLIP_benchmark's local wds layout (ROOT/test/*.tar + metadata) or a shard spec."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from pipeline.data.decode import decode_sample, lazy_extensions
from pipeline.data.sources import expand_spec
from pipeline.data.tars import tar_samples
from pipeline.errors import UserError
from pipeline.modalities.base import Skip
from pipeline.registry import MODALITIES


@dataclass
class EvalSet:
    urls: list[str]
    kind: str  # "classification" | "retrieval"
    classnames: Optional[list[str]] = None
    templates: Optional[list[str]] = None
    skipped: dict = field(default_factory=dict)


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def open_eval_set(root: str, task: str = "zeroshot_classification", split: str = "test") -> EvalSet:
    base = Path(root)
    if (base / split / "nshards.txt").is_file():
        n = int((base / split / "nshards.txt").read_text().strip())
        urls = [str(base / split / f"{i}.tar") for i in range(n)]
        missing = [u for u in urls if not Path(u).is_file()]
        if missing:
            raise UserError(f"{root}: nshards.txt says {n} shards but {missing[0]} is missing")
        meta = base
    elif base.is_dir() and (base / split).is_dir():
        raise UserError(f"{root}: {base / split / 'nshards.txt'} is missing (CLIP_benchmark wds layout)")
    else:
        urls = [u for s in expand_spec(root, key="--dataset") for u in s.urls]
        meta = Path(urls[0]).parent
    kind_file = meta / "dataset_type.txt"
    default = "retrieval" if task == "zeroshot_retrieval" else "classification"
    kind = kind_file.read_text().strip() if kind_file.is_file() else default
    classnames = _lines(meta / "classnames.txt") if (meta / "classnames.txt").is_file() else None
    templates_file = meta / "zeroshot_classification_templates.txt"
    templates = _lines(templates_file) if templates_file.is_file() else None
    if kind != "retrieval" and classnames is None:
        raise UserError(f"{root}: classification needs {meta / 'classnames.txt'} (one class name per line)")
    return EvalSet(urls, kind, classnames, templates)


def iter_batches(eval_set: EvalSet, modalities: list[str], preprocess: dict[str, Callable],
                 batch_size: int) -> Iterator[dict]:
    """Batches of preprocessed inputs + labels + caption lists, in shard order; skips are counted."""
    skipped = eval_set.skipped

    def on_error(exc):
        skipped[f"read_error_{type(exc).__name__}"] = skipped.get(f"read_error_{type(exc).__name__}", 0) + 1
        return True

    batch: list[dict] = []
    # each modality's own default members; captions are read for retrieval (classification uses class names)
    sections = {m: MODALITIES.section(m, "--modality")() for m in modalities if m != "text"}
    if eval_set.kind == "retrieval":
        sections["text"] = MODALITIES.section("text", "eval")()
    for raw in tar_samples(({"url": u} for u in eval_set.urls), on_error, lazy_extensions(sections)):
        try:
            sample = decode_sample(raw, sections)
            item = {m: preprocess[m](sample[m]) for m in modalities if m != "text"}
        except (Skip, KeyError) as exc:
            reason = exc.reason if isinstance(exc, Skip) else f"missing_{exc.args[0]}"
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        item["label"] = sample.get("label", -1)
        item["captions"] = sample.get("text", [])
        batch.append(item)
        if len(batch) == batch_size:
            yield _collate(batch)
            batch = []
    if batch:
        yield _collate(batch)


def _collate(items: list[dict]) -> dict:
    out: dict[str, Any] = {k: torch.stack([it[k] for it in items]) for k in items[0] if k not in ("label", "captions")}
    out["label"] = torch.tensor([it["label"] for it in items])
    out["captions"] = [it["captions"] for it in items]
    return out
