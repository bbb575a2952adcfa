"""Embedded demo data (data/) and the demo shard sets built from it (pipeline/data/demo.py)."""
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import soundfile
import webdataset as wds
from PIL import Image

from pipeline.data.demo import DEMO_SETS, REPO_DATA, build_demo_shards

FM, SY = REPO_DATA / "fashion_mnist", REPO_DATA / "symile"
GENERATED = (REPO_DATA / "shards", FM / "images")  # git-ignored: built from the committed files


def manifest(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_committed_data_stays_under_15_mb():
    files = [p for p in REPO_DATA.rglob("*") if p.is_file() and not any(g in p.parents for g in GENERATED)]
    assert len(files) > 100
    assert sum(p.stat().st_size for p in files) <= 15_000_000


def test_fashion_mnist_splits_are_balanced_disjoint_and_complete():
    splits = {s: manifest(FM / f"{s}.jsonl") for s in ("train", "val", "test")}
    assert {s: len(r) for s, r in splits.items()} == {"train": 3000, "val": 500, "test": 500}
    for rows, per_class in zip(splits.values(), (300, 50, 50), strict=True):
        assert Counter(r["label"] for r in rows) == {c: per_class for c in range(10)}
    origins = [{r["origin"] for r in rows} for rows in splits.values()]
    assert sum(map(len, origins)) == 4000 and len(set.union(*origins)) == 4000  # no image in two splits
    assert all(o.startswith("fashion-mnist/t10k/") for o in origins[2])
    with tarfile.open(FM / "images.tar.gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert {"images/" + n for n in members} == {r["image"] for rows in splits.values() for r in rows}
        png = Image.open(io.BytesIO(tar.extractfile(members["train/000000.png"]).read()))
        assert (png.format, png.mode, png.size) == ("PNG", "L", (28, 28))


def test_captions_name_their_class_and_negatives_differ_from_them():
    names = (FM / "classnames.txt").read_text().splitlines()
    assert len(names) == 10 and names[9] == "ankle boot"
    assert all("{c}" in t for t in (FM / "zeroshot_classification_templates.txt").read_text().splitlines())
    train, test = manifest(FM / "train.jsonl"), manifest(FM / "test.jsonl")
    assert len({r["text"] for r in train}) == 10 * 23  # every phrasing x measured-attribute combination
    for r in train:
        assert names[r["label"]] in r["text"]
        assert len(r["neg_text"]) == 2 and r["text"] not in r["neg_text"]
    assert all(len(r["text"]) == 6 and all(names[r["label"]] in t for t in r["text"]) for r in test)


def test_speech_clips_are_short_16k_mono_flac_and_test_voices_are_held_out():
    clips = sorted(REPO_DATA.glob("*/audio/*.flac"))
    assert len(clips) == 10 * 10 + 5 * 8
    for clip in clips:
        info = soundfile.info(clip)
        assert (info.format, info.samplerate, info.channels) == ("FLAC", 16_000, 1)
        assert 0.3 < info.duration < 2.0
    for folder in (FM, SY):
        train = {r["audio"] for s in ("train", "val") for r in manifest(folder / f"{s}.jsonl")}
        test = {r["audio"] for r in manifest(folder / "test.jsonl")}
        assert train and test and not train & test
        assert all((folder / a).is_file() for a in train | test)


def test_symile_text_is_determined_only_by_image_class_and_spoken_language():
    table = json.loads((SY / "languages.json").read_text(encoding="utf-8"))
    candidates = (SY / "classnames.txt").read_text(encoding="utf-8").splitlines()
    assert list(table) == ["en", "de", "fr", "es", "it"]
    assert len({c.lower() for c in candidates}) == 50
    rows = [r for s in ("train", "val", "test") for r in manifest(SY / f"{s}.jsonl")]
    pair_to_text, class_texts, language_texts = {}, {}, {}
    for r in rows:
        assert r["text"] == table[r["language"]]["classnames"][r["class"]] == candidates[r["label"]]
        assert r["audio"].startswith(f"audio/{r['language']}_")
        assert pair_to_text.setdefault((r["class"], r["language"]), r["text"]) == r["text"]
        class_texts.setdefault(r["class"], set()).add(r["text"])
        language_texts.setdefault(r["language"], set()).add(r["text"])
    assert len(pair_to_text) == 50
    assert all(len(t) == 5 for t in class_texts.values())  # the image alone leaves 5 candidates
    assert all(len(t) == 10 for t in language_texts.values())  # the audio alone leaves 10
    assert Counter(r["language"] for r in manifest(SY / "train.jsonl")) == {lang: 600 for lang in table}


def test_demo_training_shards(demo_shards):
    train = demo_shards / "demo/train"
    assert json.loads((train / "sizes.json").read_text()) == {f"train-{i:06d}.tar": 500 for i in range(6)}
    samples = list(wds.WebDataset(str(train / "train-{000000..000005}.tar"), shardshuffle=False))
    assert len(samples) == 3000 and len({s["__key__"] for s in samples}) == 3000
    assert all({"png", "txt", "json", "flac", "cls", "neg.txt"} <= set(s) for s in samples)
    assert json.loads((demo_shards / "demo/val/sizes.json").read_text()) == {"val-000000.tar": 500}
    symile = list(wds.WebDataset(str(demo_shards / "symile/train/train-{000000..000005}.tar"), shardshuffle=False))
    assert len(symile) == 3000 and all({"png", "txt", "flac", "cls", "json"} <= set(s) for s in symile)
    assert json.loads(symile[0]["json"])["language"] in {"en", "de", "fr", "es", "it"}


@pytest.mark.parametrize("name, classes, members", [
    ("demo/wds/fashion_mnist", 10, {"png", "cls"}),
    ("demo/wds/fashion_mnist_retrieval", None, {"png", "txt"}),
    ("demo/wds/fashion_mnist_audio", 10, {"flac", "cls"}),
    ("symile/wds/fashion_mnist_symile", 50, {"png", "flac", "txt", "cls"}),
])
def test_clip_benchmark_sets_are_complete(demo_shards, name, classes, members):
    root = demo_shards / name
    nshards = int((root / "test/nshards.txt").read_text())
    assert sorted(p.name for p in (root / "test").glob("*.tar")) == [f"{i}.tar" for i in range(nshards)]
    samples = list(wds.WebDataset(str(root / f"test/{{0..{nshards - 1}}}.tar"), shardshuffle=False))
    assert len(samples) == 500 and all(set(s) - {"__key__", "__url__"} == members for s in samples)
    if classes is None:
        assert (root / "dataset_type.txt").read_text() == "retrieval\n"
        assert all(len(s["txt"].decode().splitlines()) == 6 for s in samples)
    else:
        assert len((root / "classnames.txt").read_text(encoding="utf-8").splitlines()) == classes
        assert all("{c}" in t for t in (root / "zeroshot_classification_templates.txt").read_text().splitlines())
        assert Counter(int(s["cls"]) for s in samples).keys() <= set(range(classes))


@pytest.mark.parametrize("name, task", [("fashion_mnist", "zeroshot_classification"),
                                        ("fashion_mnist_retrieval", "zeroshot_retrieval")])
def test_clip_benchmark_loads_the_demo_sets(demo_shards, name, task):
    from clip_benchmark.datasets.builder import build_dataset

    ds = build_dataset(f"wds/{name}", root=str(demo_shards / "demo/wds" / name), transform=lambda im: im.size,
                       split="test", task=task)
    items = list(ds)
    assert len(items) == 500 and all(size == (28, 28) for size, _ in items)
    if task == "zeroshot_classification":
        assert ds.classes[0] == "t-shirt" and len(ds.templates) == 4
        assert Counter(label for _, label in items) == {c: 50 for c in range(10)}
    else:
        assert all(len(captions) == 6 for _, captions in items)


def test_rebuild_keeps_every_shard(demo_shards):
    reports = build_demo_shards(demo_shards, progress=False)
    assert list(reports) == [d.out for d in DEMO_SETS]
    assert all(r.written == [] and r.kept and not r.skipped for r in reports.values())
