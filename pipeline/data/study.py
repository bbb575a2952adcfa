"""Study set for batch-size and hard-negative research: thousands of distinct captions, built offline.

In the Fashion-MNIST demo every caption names one of 10 classes, so batch 32 already holds every
class and mined "hard" negatives are mostly false negatives. Here every concept (a Tux Paint stamp
or an emoji, pipeline/data/study_sources.py) is its own object name, and each picture is a scene
drawn from it with known attributes (colour tint, copies, background colour and texture, position;
pipeline/data/study_scenes.py), so captions are nearly all distinct and an edited caption is a
true hard negative.

`mmclip data study --out DIR [--size tiny|full] [--seed N]` writes under DIR:
  train/train-NNNNNN.tar, val/val-NNNNNN.tar  image (.png) + captions (.txt: English, sometimes a
                                              second line with the name in de/fr/es/it/pt) + .json
                                              (concept, origin, attributes, template, language);
                                              train also .neg.txt: the caption with one attribute
                                              edited, one line per edit that applies (data.hard_negatives)
  wds/study_concepts     CLIP_benchmark classification of the test images; classes = test concepts
  wds/study_retrieval    CLIP_benchmark retrieval: test images, two captions each
  probe/probe.jsonl      compositional probe: test image path, its caption (pos), the same caption
                         with one attribute edited (neg), the edit type and both attribute sets;
                         scored by pipeline.eval.probe.probe_accuracy (`mmclip eval --task
                         compositional_probe --dataset DIR/probe`)
  probe/images/          the test images
  val_probe/             the same probe on the val scenes, for choosing settings without the test split
  study.json             recipe and counts; a rerun with the same recipe returns at once
Splits are disjoint by concept (so by source picture): 85% train, 5% val, 10% test.

Sizes: full uses all 2,237 concepts (461 Tux Paint stamps, 1,776 emoji), 12 training scenes each
(22,812 train images, 448 val, 672 test; 2,168 probe and 1,410 val probe items), 64 px PNGs, 120 MB; it
builds in ~1 CPU-minute (2-3.5 min wall on a busy 2-core machine), tiny (80 concepts, for tests) in seconds. Why
64 px and ~23k: big enough for 4 copies of a recognisable picture and for a batch of 512 to hold ~450
different concepts, small enough for a patch-8 ViT (64 tokens; width 96-128, 2-4 layers), whose step
costs 0.5-0.65x the demo model's (measured side by side, batch 128, 2 threads), i.e. roughly 20-30
epochs in 30 minutes where the demo trains at ~700 images/s. Bytes depend only on the seed, the recipe
version and the installed sources (the emoji package's version is part of the recipe).
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import emoji
import numpy as np

from pipeline.data.study_scenes import EDITS, TEMPLATES, caption, render, sample_scene
from pipeline.data.study_sources import Concept, list_concepts
from pipeline.data.writer import write_shards
from pipeline.errors import UserError

RECIPE_VERSION = 3  # bump when a change alters any output byte: cached sets are rebuilt
PX = 64
SPLITS = ("train", "val", "test")
HELD_OUT = {"val": 0.05, "test": 0.10}  # fractions of concepts; at least MIN_HELD_OUT each
MIN_HELD_OUT = 4  # an object edit needs other concepts in the split
TRANSLATION_CHANCE = 0.3  # training/val scenes that get a second caption in another language
RETRIEVAL_CAPTIONS = 2
SHARD_SIZE = 2000
ZEROSHOT_TEMPLATES = ["{c}", "a picture of the {c}.", "clip art of the {c}."]
OUTPUTS = ("train", "val", "wds", "probe", "val_probe")  # and study.json, written last


@dataclass(frozen=True)
class Size:
    concepts: int | None  # None: every concept the sources have
    scenes: dict[str, int]  # split -> scenes per concept


SIZES = {"tiny": Size(80, {"train": 4, "val": 2, "test": 3}), "full": Size(None, {"train": 12, "val": 4, "test": 3})}


def build_study_set(out: str | Path, size: str = "full", seed: int = 0, progress: bool = True) -> dict:
    """Build (or find already built) the study set under `out`; returns the contents of study.json."""
    if size not in SIZES:
        raise UserError(f"study set size {size!r} is not one of {', '.join(SIZES)}")
    out = Path(out)
    recipe = {"version": RECIPE_VERSION, "size": size, "seed": seed, "px": PX, "emoji": emoji.__version__}
    done = out / "study.json"
    if done.is_file() and json.loads(done.read_text())["recipe"] == recipe:
        return json.loads(done.read_text())
    start = time.monotonic()
    splits = split_concepts(list_concepts(), SIZES[size], seed)  # first: a missing source keeps an older set
    done.unlink(missing_ok=True)
    staging = out / ".staging"
    for folder in (*(out / name for name in OUTPUTS), staging):
        shutil.rmtree(folder, ignore_errors=True)
    counts = {}
    for split in ("train", "val"):
        rows = _scene_rows(split, splits[split], SIZES[size].scenes[split], seed, staging / split)
        manifest = _write_manifest(staging / split / "manifest.jsonl", rows)
        counts[split] = write_shards(manifest, out / split, prefix=split, maxcount=SHARD_SIZE,
                                     progress=progress).samples
        if split == "val":
            counts["val_probe"] = _write_probe(out / "val_probe", rows, splits[split], staging / split)
    counts.update(_write_test_sets(out, staging, splits["test"], SIZES[size].scenes["test"], seed, progress))
    shutil.rmtree(staging)
    summary = {"recipe": recipe, "concepts": {s: len(c) for s, c in splits.items()}, "samples": counts,
               "build_seconds": round(time.monotonic() - start, 1)}
    done.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def split_concepts(concepts: list[Concept], size: Size, seed: int) -> dict[str, list[Concept]]:
    """A seeded choice of concepts, cut into val, test and train."""
    order = np.random.default_rng(seed).permutation(len(concepts))[: size.concepts]
    chosen = [concepts[i] for i in order]
    held = {s: max(MIN_HELD_OUT, round(f * len(chosen))) for s, f in HELD_OUT.items()}
    return {"val": chosen[: held["val"]], "test": chosen[held["val"]: held["val"] + held["test"]],
            "train": chosen[held["val"] + held["test"]:]}


def _scene_rows(split: str, concepts: list[Concept], per_concept: int, seed: int, folder: Path) -> list[dict]:
    """Render every scene of a split into `folder` as PNG; rows in a seeded shuffled order, keyed by it."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    jobs = [(i, k) for i in range(len(concepts)) for k in range(per_concept)]
    order = np.random.default_rng([seed, SPLITS.index(split)]).permutation(len(jobs))
    rows, pictures = [], {}
    for n, j in enumerate(order):
        i, k = jobs[j]
        concept, rng = concepts[i], np.random.default_rng([seed, SPLITS.index(split), i, k])
        scene = sample_scene(concept.name, concept.tintable, rng)
        if i not in pictures:
            pictures[i] = concept.picture()
        key = f"{split}-{n:06d}"
        render(scene, pictures[i], PX, rng).save(folder / "images" / f"{key}.png")
        template = int(rng.integers(len(TEMPLATES)))
        text, language = [caption(scene, template)], "en"
        if split != "test" and concept.translations and rng.random() < TRANSLATION_CHANCE:
            language = str(rng.choice(sorted(concept.translations)))
            text.append(concept.translations[language])
        row = {"key": key, "image": f"images/{key}.png", "text": text, "concept": concept.name,
               "origin": concept.origin, "attributes": scene.as_dict(), "template": template, "language": language,
               "scene": scene, "rng": rng}
        if split == "train":
            row["neg_text"] = _edited_captions(row, {c.name: c.tintable for c in concepts})
        rows.append(row)
    return rows


def _edited_captions(row: dict, tintable: dict[str, bool]) -> list[str]:
    """A training scene's explicit hard negatives (NegCLIP): its caption under every edit that applies, in a
    seeded order, so a run taking the first k of them sees every edit type."""
    others = {name: t for name, t in tintable.items() if name != row["concept"]}
    edited = [e for e in (apply(row["scene"], others, row["rng"]) for apply in EDITS.values()) if e is not None]
    return [caption(edited[i], row["template"]) for i in row["rng"].permutation(len(edited))]


def _write_manifest(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k not in ("scene", "rng")}, ensure_ascii=False)
                            + "\n" for r in rows), encoding="utf-8")
    return path


def _write_test_sets(out: Path, staging: Path, concepts: list[Concept], per_concept: int, seed: int,
                     progress: bool) -> dict[str, int]:
    """The test scenes as CLIP_benchmark classification and retrieval sets, and the probe beside its images."""
    probe = out / "probe"
    rows = _scene_rows("test", concepts, per_concept, seed, probe)
    names = [c.name for c in concepts]
    images = [str((probe / r["image"]).resolve()) for r in rows]  # eval shards do not record the path
    classification = [{**r, "label": names.index(r["concept"]), "image": im} for r, im in zip(rows, images)]
    retrieval = [{**r, "text": _retrieval_captions(r), "image": im} for r, im in zip(rows, images)]
    counts = {}
    for name, task, fields, manifest_rows in (("study_concepts", "classification", ["image", "label"], classification),
                                             ("study_retrieval", "retrieval", ["image", "text"], retrieval)):
        manifest = _write_manifest(staging / "test" / name / "manifest.jsonl", manifest_rows)
        counts[name] = write_shards(manifest, out / "wds" / name, layout="clip_benchmark", task=task, fields=fields,
                                    classnames=names, templates=ZEROSHOT_TEMPLATES, progress=progress).samples
    counts["probe"] = _write_probe(probe, rows, concepts)
    return counts


def _write_probe(probe: Path, rows: list[dict], concepts: list[Concept], images: Path | None = None) -> int:
    """probe.jsonl for a split's scenes (their images copied from `images` unless already in `probe`)."""
    if images is not None:
        shutil.copytree(images / "images", probe / "images")
    items = [item for r in rows for item in _probe_items(r, {c.name: c.tintable for c in concepts})]
    _write_manifest(probe / "probe.jsonl", items)
    return len(items)


def _retrieval_captions(row: dict) -> list[str]:
    """The row's caption first, then others from different templates."""
    others = [t for t in range(len(TEMPLATES)) if t != row["template"]]
    picked = row["rng"].choice(others, RETRIEVAL_CAPTIONS - 1, replace=False)
    return row["text"] + [caption(row["scene"], int(t)) for t in picked]


def _probe_items(row: dict, tintable: dict[str, bool]) -> list[dict]:
    """One item per edit type that applies to the scene: the true caption against its edited copy."""
    others = {name: t for name, t in tintable.items() if name != row["concept"]}
    items = []
    for edit, apply in EDITS.items():
        edited = apply(row["scene"], others, row["rng"])
        if edited is not None:
            items.append({"key": f"{row['key']}-{edit}", "image": row["image"], "pos": row["text"][0],
                          "neg": caption(edited, row["template"]), "edit": edit, "template": row["template"],
                          "attributes": row["attributes"], "neg_attributes": edited.as_dict()})
    return items


# ------------------------------------------------------------------------------------------------ CLI
def add_study_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (a rerun with the same "
                        "recipe returns at once)")
    parser.add_argument("--size", choices=list(SIZES), default="full",
                        help="full: ~23k train images of 2,237 concepts; tiny: 80 concepts, for tests")
    parser.add_argument("--seed", type=int, default=0, help="chooses concepts, splits and scenes (0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_study(args: argparse.Namespace) -> int:
    summary = build_study_set(args.out, args.size, args.seed, progress=not args.no_progress)
    print(json.dumps(summary, indent=1))
    return 0
