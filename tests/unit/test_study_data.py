"""The study set (pipeline/data/study.py) at --size tiny: determinism, caching, distinct captions, disjoint
splits, eval sets both readers load, and probe negatives (test and val) that are exactly one true edit away."""
import difflib
import hashlib
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline.cli import main
from pipeline.data import study
from pipeline.data.study_scenes import COUNTS, PALETTE, POSITIONS, Scene, background_shades, caption
from pipeline.data.study_sources import EMOJI_FONT, TUXPAINT
from pipeline.eval.datasets import iter_batches, open_eval_set
from pipeline.eval.probe import probe_accuracy, read_probe
from pipeline.eval.run import evaluate
from pipeline.models import build_model
from pipeline.models.config import ModelConfig

if not (TUXPAINT.is_dir() and EMOJI_FONT.is_file()):
    pytest.skip("needs tuxpaint-stamps-default and fonts-noto-color-emoji (tests/install_system_deps.sh)",
                allow_module_level=True)

EDITED = {"object": ("object",), "colour": ("colour",), "count": ("count",), "position": ("position",),
          "swap_attribute": ("colour", "background")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("study")
    study.build_study_set(out, "tiny", seed=0, progress=False)
    return out


def _digests(root: Path) -> dict[str, str]:
    """Every file of the set but study.json (it records the build time) and the writer's *_stats.json (they
    fingerprint the absolute paths the shards were written from)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "study.json" and not p.name.endswith("_stats.json")}


def _samples(root: Path, split: str) -> list[dict]:
    return list(wds.WebDataset(sorted(str(p) for p in (root / split).glob("*.tar")), shardshuffle=False))


def _tiny_model():
    text = {"kind": "open_clip_text", "options": {"context_length": 32, "width": 32, "heads": 2, "layers": 1}}
    image = {"kind": "open_clip_vision", "options": {"image_size": 64, "patch_size": 16, "width": 32, "layers": 1,
                                                     "head_width": 16}}
    torch.manual_seed(0)
    return build_model(ModelConfig(embed_dim=16, towers={"image": image, "text": text})).eval()


def test_same_seed_same_bytes_other_seed_other_set_and_reruns_are_cached(tiny, tmp_path, monkeypatch):
    again = tmp_path / "again"
    study.build_study_set(again, "tiny", seed=0, progress=False)
    assert _digests(again) == _digests(tiny) and len(_digests(tiny)) > 30
    other = study.build_study_set(tmp_path / "other", "tiny", seed=1, progress=False)
    assert _digests(tmp_path / "other")["probe/probe.jsonl"] != _digests(tiny)["probe/probe.jsonl"]
    assert other["samples"]["train"] > 200

    shard = again / "train/train-000000.tar"
    before, start = shard.stat().st_mtime_ns, time.monotonic()
    assert study.build_study_set(again, "tiny", seed=0, progress=False) == json.loads((again / "study.json").read_text())
    assert time.monotonic() - start < 1 and shard.stat().st_mtime_ns == before  # nothing rebuilt
    monkeypatch.setattr(study, "RECIPE_VERSION", study.RECIPE_VERSION + 1)
    rebuilt = study.build_study_set(again, "tiny", seed=0, progress=False)
    assert rebuilt["recipe"]["version"] == study.RECIPE_VERSION and shard.stat().st_mtime_ns != before
    assert _digests(again) == _digests(tiny)  # the bump rebuilt the same recipe: same bytes


def test_captions_are_nearly_all_distinct_and_name_many_concepts(tiny):
    samples = _samples(tiny, "train")
    summary = json.loads((tiny / "study.json").read_text())
    assert len(samples) == summary["samples"]["train"] == summary["concepts"]["train"] * 4
    english = [s["txt"].decode().splitlines()[0] for s in samples]
    assert len(set(english)) >= 0.95 * len(samples)  # the full set: ~23k distinct of ~23k
    concepts = Counter(json.loads(s["json"])["concept"] for s in samples)
    assert len(concepts) == summary["concepts"]["train"] >= 60 and set(concepts.values()) == {4}
    assert len({json.loads(s["json"])["concept"] for s in samples[:32]}) >= 24  # a batch of 32 is not 10 classes
    translated = [s for s in samples if len(s["txt"].decode().splitlines()) == 2]
    assert translated and all(json.loads(s["json"])["language"] in ("de", "fr", "es", "it", "pt") for s in translated)
    for s, text in zip(samples, english):
        meta = json.loads(s["json"])
        assert text == caption(Scene(**meta["attributes"]), meta["template"])  # written from the stored attributes


def test_splits_are_disjoint_by_concept_and_source_picture(tiny):
    meta = {split: [json.loads(s["json"]) for s in _samples(tiny, split)] for split in ("train", "val")}
    test_names = (tiny / "wds/study_concepts/classnames.txt").read_text().splitlines()
    names = {split: {m["concept"] for m in rows} for split, rows in meta.items()} | {"test": set(test_names)}
    origins = {split: {m["origin"] for m in rows} for split, rows in meta.items()}
    assert [len(names[s]) for s in ("train", "val", "test")] == [68, 4, 8]
    assert not names["train"] & names["val"] and not names["train"] & names["test"] and not names["val"] & names["test"]
    assert not origins["train"] & origins["val"] and len(origins["train"]) == len(names["train"])
    assert {it["attributes"]["object"] for it in read_probe(tiny / "probe")} == set(test_names)
    sources = {o.partition(":")[0] for o in origins["train"]}
    assert sources == {"tuxpaint", "emoji"}


def test_eval_sets_are_read_by_the_project_and_by_clip_benchmark(tiny):
    from clip_benchmark.datasets.builder import build_dataset

    from pipeline.modalities.preprocess import preprocessors

    model = _tiny_model()
    pre = preprocessors(model.inputs(), None, train=False)
    concepts, retrieval = tiny / "wds/study_concepts", tiny / "wds/study_retrieval"
    eval_set = open_eval_set(str(concepts))
    assert eval_set.kind == "classification" and len(eval_set.classnames) == 8 and len(eval_set.templates) == 3
    batch = next(iter_batches(eval_set, ["image"], pre, 100))
    assert batch["image"].shape == (24, 3, 64, 64) and Counter(batch["label"].tolist()) == {c: 3 for c in range(8)}
    batch = next(iter_batches(open_eval_set(str(retrieval), "zeroshot_retrieval"), ["image"], pre, 100))
    assert len(batch["captions"]) == 24 and all(len(c) == 2 and c[0] != c[1] for c in batch["captions"])
    assert evaluate(model, "zeroshot_classification", str(concepts))["samples"] == 24
    assert evaluate(model, "zeroshot_retrieval", str(retrieval))["samples"] == 24

    ds = build_dataset("wds/study_concepts", root=str(concepts), transform=lambda im: im.size, split="test",
                       task="zeroshot_classification")
    assert ds.classes == eval_set.classnames and [size for size, _ in ds] == [(64, 64)] * 24
    ds = build_dataset("wds/study_retrieval", root=str(retrieval), transform=lambda im: im.size, split="test",
                       task="zeroshot_retrieval")
    assert all(len(captions) == 2 for _, captions in ds)


def _changed_words(a: str, b: str) -> tuple[set[str], set[str]]:
    x, y = ([w.strip(".,:") for w in c.split() if w not in ("a", "an")] for c in (a, b))
    ops = [op for op in difflib.SequenceMatcher(a=x, b=y).get_opcodes() if op[0] != "equal"]
    return {w for _, i1, i2, _, _ in ops for w in x[i1:i2]}, {w for _, _, _, j1, j2 in ops for w in y[j1:j2]}


def _value_words(attributes: dict, fields: set[str]) -> set[str]:
    """The words the captions spend on these attributes' values."""
    phrases = {"object": attributes["object"], "colour": attributes["colour"] or "", "background": attributes["background"],
               "count": COUNTS[attributes["count"]], "position": POSITIONS[attributes["position"]]}
    return {w for f in fields for w in phrases[f].split()}


def test_probe_negatives_are_one_edit_that_does_not_describe_the_image(tiny):
    items = read_probe(tiny / "probe")
    retrieval = {s["png"]: s["txt"].decode().splitlines()
                 for s in wds.WebDataset(str(tiny / "wds/study_retrieval/test/0.tar"), shardshuffle=False)}
    assert len(items) >= 50 and set(Counter(it["edit"] for it in items)) == set(EDITED)
    for it in items:
        assert it["pos"] == retrieval[(tiny / "probe" / it["image"]).read_bytes()][0]  # the image's own caption
        _assert_one_true_edit(it)
    for image in {it["image"] for it in items}:  # the stored attributes are in the picture
        attrs = next(it["attributes"] for it in items if it["image"] == image)
        pixels = np.asarray(Image.open(tiny / "probe" / image).convert("RGB")).reshape(-1, 3)
        cover = {c: sum((np.abs(pixels - shade).sum(1) <= 3).mean() for shade in background_shades(c)) for c in PALETTE}
        assert max(cover, key=cover.get) == attrs["background"] and cover[attrs["background"]] > 0.2, image


def _assert_one_true_edit(it: dict) -> None:
    true, neg = it["attributes"], it["neg_attributes"]
    assert it["pos"] == caption(Scene(**true), it["template"]) and it["neg"] == caption(Scene(**neg), it["template"])
    changed = {k for k in true if true[k] != neg[k]}
    assert changed == set(EDITED[it["edit"]]), it
    if it["edit"] == "swap_attribute":
        assert (neg["colour"], neg["background"]) == (true["background"], true["colour"])
    old, new = _changed_words(it["pos"], it["neg"])  # the words that differ, articles aside
    assert old and new and old <= _value_words(true, changed) and new <= _value_words(neg, changed), it


def test_the_val_probe_asks_the_same_of_every_val_scene(tiny):
    """val_probe/ is the probe built from the val split (for tuning without the test split): its images are the
    val shards' images, each item's positive is that image's caption, its negative one true edit away."""
    items, val = read_probe(tiny / "val_probe"), _samples(tiny, "val")
    captions = {s["png"]: s["txt"].decode().splitlines()[0] for s in val}
    assert {(tiny / "val_probe" / it["image"]).read_bytes() for it in items} == set(captions)  # every val image
    assert {it["attributes"]["object"] for it in items} == {json.loads(s["json"])["concept"] for s in val}
    for it in items:
        assert it["pos"] == captions[(tiny / "val_probe" / it["image"]).read_bytes()]
        _assert_one_true_edit(it)
    summary = json.loads((tiny / "study.json").read_text())
    assert summary["samples"]["val_probe"] == len(items) >= 2 * len(val)
    assert evaluate(_tiny_model(), "compositional_probe", str(tiny / "val_probe"))["probe_items"] == len(items)


def test_training_scenes_carry_their_edited_captions_as_hard_negatives(tiny):
    """Every train sample has a .neg.txt: its caption under each edit that applies, a true one-edit negative
    (data.hard_negatives reads it); val and test samples have none."""
    for s in _samples(tiny, "train"):
        meta, caption_en = json.loads(s["json"]), s["txt"].decode().splitlines()[0]
        negatives = s["neg.txt"].decode().splitlines()
        assert 2 <= len(negatives) <= len(EDITED) and len(set(negatives)) == len(negatives)
        assert caption_en == caption(Scene(**meta["attributes"]), meta["template"])
        for neg in negatives:  # the words that differ are the values of the attributes one edit changes
            old, new = _changed_words(caption_en, neg)
            assert old and new and any(old <= _value_words(meta["attributes"], set(f)) for f in EDITED.values()), neg
    assert not any("neg.txt" in s for s in _samples(tiny, "val"))


def test_probe_accuracy_of_an_oracle_a_blind_model_and_a_real_one(tiny):
    probe = tiny / "probe"
    items = read_probe(probe)
    pos_of = {np.asarray(Image.open(probe / it["image"]).convert("RGB")).tobytes(): it["pos"] for it in items}
    texts = sorted({t for it in items for t in (it["pos"], it["neg"])})

    def encode_texts(batch):
        return torch.nn.functional.one_hot(torch.tensor([texts.index(t) for t in batch]), len(texts)).float()

    def oracle(images):  # knows each test image's true caption
        return encode_texts([pos_of[np.asarray(im).tobytes()] for im in images])

    scores = probe_accuracy((oracle, encode_texts), probe, batch_size=7)
    assert scores["probe_acc"] == 1.0 and scores["probe_items"] == len(items)
    assert {k for k in scores if k.startswith("probe_acc_")} == {f"probe_acc_{e}" for e in EDITED}
    blind = probe_accuracy((lambda ims: torch.ones(len(ims), 3), lambda ts: torch.ones(len(ts), 3)), probe)
    assert blind["probe_acc"] == 0.0  # ties are misses
    real = probe_accuracy(_tiny_model(), probe)
    assert 0.0 <= real["probe_acc"] <= 1.0 and real["probe_items"] == len(items)
    assert evaluate(_tiny_model(), "compositional_probe", str(probe)) == real  # `mmclip eval --task compositional_probe`


def test_cli_builds_and_then_finds_the_set(tiny, capsys):
    start = time.monotonic()
    assert main(["data", "study", "--out", str(tiny), "--size", "tiny", "--no-progress"]) == 0
    assert time.monotonic() - start < 1
    assert json.loads(capsys.readouterr().out) == json.loads((tiny / "study.json").read_text())


def test_a_missing_source_is_named_with_its_package(tmp_path, monkeypatch, capsys):
    from pipeline.data import study_sources

    monkeypatch.setattr(study_sources, "TUXPAINT", tmp_path / "no-stamps")
    assert main(["data", "study", "--out", str(tmp_path / "out"), "--size", "tiny", "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == (f"mmclip: error: the study set needs {tmp_path / 'no-stamps'}: "
                                               "apt-get install -y tuxpaint-stamps-default")


def test_the_parity_copy_keeps_each_caption_s_english_line_only(tiny, tmp_path):
    """open_clip_train reads a .txt as one caption; the parity study gives both trainers the first line."""
    from pipeline.bench.quality import english_only_copy

    english_only_copy(tiny / "train", tmp_path / "en")
    original, copy = _samples(tiny, "train"), _samples(tmp_path, "en")
    assert [s["__key__"] for s in copy] == [s["__key__"] for s in original]
    assert any(len(s["txt"].decode().splitlines()) == 2 for s in original)
    for a, b in zip(original, copy):
        assert b["txt"].decode() == a["txt"].decode().splitlines()[0] and b["png"] == a["png"]
    stamp = (tmp_path / "en" / "done").stat().st_mtime_ns
    english_only_copy(tiny / "train", tmp_path / "en")  # written once
    assert (tmp_path / "en" / "done").stat().st_mtime_ns == stamp
