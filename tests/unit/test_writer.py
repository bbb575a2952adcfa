"""Shard writer: manifest/folder -> shards -> plain webdataset and CLIP_benchmark readers, resume, bad inputs."""
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
import webdataset as wds
from PIL import Image

from pipeline.cli import main as cli_main
from pipeline.data.manifest import read_source
from pipeline.data.writer import plan_shards, write_shards
from pipeline.errors import UserError

RATE = 16_000


def make_image(path: Path, seed: int, fmt: str = "PNG") -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 6, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return pixels


def make_audio(path: Path, seed: int, fmt: str = "FLAC") -> np.ndarray:
    samples = (np.random.default_rng(seed).uniform(-0.5, 0.5, 800) * 32767).astype(np.int16)
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, samples, RATE, format=fmt, subtype="PCM_16")
    return samples


def make_rows(root: Path, n: int = 7) -> list[dict]:
    """n rows with every modality; images and audio alternate formats (png/jpg, flac/wav)."""
    rows = []
    for i in range(n):
        image = f"img/{i}.{'png' if i % 2 == 0 else 'bmp'}"
        audio = f"aud/{i}.{'flac' if i % 2 == 0 else 'wav'}"
        make_image(root / image, i, "PNG" if i % 2 == 0 else "BMP")
        make_audio(root / audio, i, "FLAC" if i % 2 == 0 else "WAV")
        rows.append({"key": f"k{i}", "image": image, "audio": audio, "text": f"caption {i}",
                     "label": i % 3, "neg_text": [f"wrong {i}", f"also wrong {i}"], "note": f"n{i}"})
    return rows


def write_manifest(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix in (".csv", ".tsv"):
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if path.suffix == ".tsv" else ",")
            w.writeheader()
            w.writerows({k: "\n".join(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def read_all(pattern: str) -> list[dict]:
    return list(wds.WebDataset(pattern, shardshuffle=False))


def decode_image(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".tsv", ".parquet"])
def test_webdataset_round_trip_every_modality(tmp_path, suffix):
    rows = make_rows(tmp_path)
    manifest = write_manifest(tmp_path / f"m{suffix}", rows)
    report = write_shards(manifest, tmp_path / "out", maxcount=3, progress=False)

    assert report.shards == ["m-000000.tar", "m-000001.tar", "m-000002.tar"]
    assert json.loads((tmp_path / "out/sizes.json").read_text()) == \
        {"m-000000.tar": 3, "m-000001.tar": 3, "m-000002.tar": 1}
    samples = read_all(str(tmp_path / "out/m-{000000..000002}.tar"))
    assert [s["__key__"] for s in samples] == [r["key"] for r in rows]
    for i, s in enumerate(samples):
        assert np.array_equal(decode_image(s["png"]), make_image(tmp_path / "x.png", i))  # bmp re-encoded to png
        audio_ext = "flac" if i % 2 == 0 else "wav"
        decoded, rate = soundfile.read(io.BytesIO(s[audio_ext]), dtype="int16")
        assert rate == RATE and np.array_equal(decoded, make_audio(tmp_path / "x.flac", i))
        assert s["txt"].decode() == f"caption {i}"
        assert int(s["cls"]) == i % 3
        assert s["neg.txt"].decode().splitlines() == [f"wrong {i}", f"also wrong {i}"]
        meta = json.loads(s["json"])
        assert (meta["caption"], meta["text"], meta["label"], meta["note"]) == (f"caption {i}",) * 2 + (i % 3, f"n{i}")
        assert (meta["width"], meta["height"], meta["sample_rate"]) == (6, 8, RATE)


def test_any_subset_of_modalities_and_generated_keys(tmp_path):
    make_audio(tmp_path / "a.flac", 0)
    manifest = write_manifest(tmp_path / "audio.jsonl", [{"audio": "a.flac", "text": "a dog barks"},
                                                         {"audio": "a.flac", "text": "rain"}])
    write_shards(manifest, tmp_path / "out", progress=False)
    samples = read_all(str(tmp_path / "out/audio-000000.tar"))
    assert [s["__key__"] for s in samples] == ["000000000", "000000001"]
    assert all(set(s) == {"__key__", "__url__", "flac", "txt", "json"} for s in samples)
    assert json.loads(samples[1]["json"])["text"] == "rain"


def test_fields_limits_the_written_members(tmp_path):
    manifest = write_manifest(tmp_path / "m.jsonl", make_rows(tmp_path, 2))
    write_shards(manifest, tmp_path / "out", fields=["audio", "label"], progress=False)
    assert {k for s in read_all(str(tmp_path / "out/m-000000.tar")) for k in s} == \
        {"__key__", "__url__", "flac", "wav", "cls", "json"}


def test_folder_tree_source(tmp_path):
    root = tmp_path / "tree"
    make_image(root / "ankle_boot/a.png", 1)
    (root / "ankle_boot/a.txt").write_text("a boot\nan ankle boot\n")
    make_image(root / "ankle_boot/b.jpg", 2, "JPEG")
    make_audio(root / "bag/c.wav", 3, "WAV")
    (root / "bag/c.neg.txt").write_text("a shoe\n")
    (root / "bag/notes.md").write_text("not data")
    report = write_shards(root, tmp_path / "out", progress=False)

    assert report.skipped_by_reason == {"unsupported_file": 1}
    assert report.skipped[0].key == "bag/notes.md"
    samples = read_all(str(tmp_path / "out/tree-000000.tar"))
    assert [(sorted(k for k in s if not k.startswith("__")), int(s["cls"])) for s in samples] == [
        (["cls", "json", "png", "txt"], 0), (["cls", "jpg", "json"], 0), (["cls", "json", "neg.txt", "wav"], 1)]
    assert samples[0]["txt"].decode().splitlines() == ["a boot", "an ankle boot"]
    assert json.loads(samples[2]["json"])["classname"] == "bag"
    assert read_source(root).classnames == ["ankle boot", "bag"]


def test_string_labels_map_to_classnames(tmp_path):
    make_image(tmp_path / "i.png", 0)
    rows = [{"image": "i.png", "label": name} for name in ("cat", "dog", "cat")]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    assert [r.label for r in read_source(manifest).rows] == [0, 1, 0]  # sorted names without a class list
    assert [r.label for r in read_source(manifest, ["dog", "cat"]).rows] == [1, 0, 1]
    with pytest.raises(UserError, match=r"m.csv row 1: label 'cat' is not"):
        read_source(manifest, ["bird"])


def test_clip_benchmark_classification_layout(tmp_path):
    from clip_benchmark.datasets.builder import build_dataset

    manifest = write_manifest(tmp_path / "m.jsonl", make_rows(tmp_path, 7))
    root = tmp_path / "wds_set"
    report = write_shards(manifest, root, layout="clip_benchmark", maxcount=3, fields=["image", "label"],
                          classnames=["cat", "dog", "bird"], templates=["a photo of a {c}.", "a {c}."],
                          progress=False)

    assert report.shards == ["test/0.tar", "test/1.tar", "test/2.tar"]
    assert (root / "test/nshards.txt").read_text() == "3\n"
    assert (root / "classnames.txt").read_text() == "cat\ndog\nbird\n"
    assert (root / "zeroshot_classification_templates.txt").read_text() == "a photo of a {c}.\na {c}.\n"
    assert not (root / "dataset_type.txt").exists()
    assert {k for s in read_all(str(root / "test/{0..2}.tar")) for k in s} == {"__key__", "__url__", "png", "cls"}
    ds = build_dataset("wds/mine", root=str(root), transform=decode_shape, split="test")
    assert ds.classes == ["cat", "dog", "bird"] and ds.templates == ["a photo of a {c}.", "a {c}."]
    assert [label for _, label in ds] == [i % 3 for i in range(7)]
    assert all(shape == (8, 6) for shape, _ in ds)


def decode_shape(image) -> tuple[int, int]:
    return image.size[::-1]


def test_clip_benchmark_retrieval_layout(tmp_path):
    from clip_benchmark.datasets.builder import build_dataset

    rows = make_rows(tmp_path, 4)
    for r in rows:
        r["text"] = [f"first {r['key']}", f"second {r['key']}"]
    root = tmp_path / "ret"
    write_shards(write_manifest(tmp_path / "m.jsonl", rows), root, layout="clip_benchmark", task="retrieval",
                 progress=False)
    assert (root / "dataset_type.txt").read_text().strip() == "retrieval"
    ds = build_dataset("wds/ret", root=str(root), transform=decode_shape, split="test",
                       task="zeroshot_retrieval")
    assert [captions for _, captions in ds] == [[f"first k{i}", f"second k{i}"] for i in range(4)]


def test_clip_benchmark_needs_classnames_and_templates_with_placeholder(tmp_path):
    manifest = write_manifest(tmp_path / "m.jsonl", make_rows(tmp_path, 2))
    with pytest.raises(UserError, match="no class names .*--classnames"):
        write_shards(manifest, tmp_path / "a", layout="clip_benchmark", progress=False)
    with pytest.raises(UserError, match=r"template 'a photo' has no \{c\}"):
        write_shards(manifest, tmp_path / "b", layout="clip_benchmark", classnames=["x", "y"],
                     templates=["a photo"], progress=False)
    (tmp_path / "classnames.txt").write_text("x\ny\n")  # found next to the manifest
    write_shards(manifest, tmp_path / "c", layout="clip_benchmark", progress=False)
    assert (tmp_path / "c/zeroshot_classification_templates.txt").read_text() == "a photo of a {c}.\n"


def test_resume_rewrites_only_the_missing_shard(tmp_path):
    manifest = write_manifest(tmp_path / "m.jsonl", make_rows(tmp_path, 7))
    out = tmp_path / "out"
    first = write_shards(manifest, out, maxcount=2, progress=False)
    assert first.written == ["m-000000.tar", "m-000001.tar", "m-000002.tar", "m-000003.tar"]
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("*.tar")}
    (out / "m-000002.tar").unlink()
    (out / "m-000001.tar.partial").write_bytes(b"left over by a killed run")

    second = write_shards(manifest, out, maxcount=2, progress=False)
    assert second.written == ["m-000002.tar"] and len(second.kept) == 3 and second.samples == 7
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("*.tar")}
    assert after["m-000002.tar"][0] == before["m-000002.tar"][0]  # byte-identical rewrite
    assert all(after[n] == before[n] for n in before if n != "m-000002.tar")
    assert not list(out.glob("*.partial"))


def test_changed_rows_rewrite_their_shard_and_shrinking_removes_stale_shards(tmp_path):
    rows = make_rows(tmp_path, 7)
    out = tmp_path / "out"
    write_shards(write_manifest(tmp_path / "m.jsonl", rows), out, maxcount=2, progress=False)
    rows[3]["text"] = "edited"
    assert write_shards(write_manifest(tmp_path / "m.jsonl", rows), out, maxcount=2,
                        progress=False).written == ["m-000001.tar"]
    write_shards(write_manifest(tmp_path / "m.jsonl", rows[:3]), out, maxcount=2, progress=False)
    assert sorted(p.name for p in out.glob("*.tar")) == ["m-000000.tar", "m-000001.tar"]
    assert json.loads((out / "sizes.json").read_text()) == {"m-000000.tar": 2, "m-000001.tar": 1}


def test_two_prefixes_share_a_folder(tmp_path):
    manifest = write_manifest(tmp_path / "m.jsonl", make_rows(tmp_path, 3))
    write_shards(manifest, tmp_path / "out", prefix="a", progress=False)
    write_shards(manifest, tmp_path / "out", prefix="b", maxcount=2, progress=False)
    assert json.loads((tmp_path / "out/sizes.json").read_text()) == \
        {"a-000000.tar": 3, "b-000000.tar": 2, "b-000001.tar": 1}


def test_unreadable_inputs_are_skipped_counted_and_listed(tmp_path):
    rows = make_rows(tmp_path, 6)
    (tmp_path / rows[1]["image"]).write_bytes(b"not an image at all")
    flac = (tmp_path / rows[2]["audio"]).read_bytes()
    (tmp_path / rows[2]["audio"]).write_bytes(flac[:60])  # truncated inside the stream header
    rows[3]["image"] = "img/missing.png"
    rows.append({"key": "k6", "note": "nothing else"})
    manifest = write_manifest(tmp_path / "m.jsonl", rows)

    report = write_shards(manifest, tmp_path / "out", maxcount=4, progress=False)
    assert report.samples == 3
    assert report.skipped_by_reason == {"corrupt_image": 1, "corrupt_audio": 1, "missing_file": 1, "empty_row": 1}
    assert {s.key: s.reason for s in report.skipped} == \
        {"k1": "corrupt_image", "k2": "corrupt_audio", "k3": "missing_file", "k6": "empty_row"}
    assert "missing.png" in next(s.detail for s in report.skipped if s.key == "k3")
    assert [s["__key__"] for s in read_all(str(tmp_path / "out/m-{000000..000001}.tar"))] == ["k0", "k4", "k5"]
    assert json.loads((tmp_path / "out/sizes.json").read_text()) == {"m-000000.tar": 1, "m-000001.tar": 2}
    rerun = write_shards(manifest, tmp_path / "out", maxcount=4, progress=False)
    assert rerun.written == [] and rerun.skipped_by_reason == report.skipped_by_reason
    assert "skipped 4 inputs: 1 corrupt_audio, 1 corrupt_image, 1 empty_row, 1 missing_file" in rerun.summary()


def test_plan_respects_maxcount_and_maxsize(tmp_path):
    rows = make_rows(tmp_path, 10)
    source = read_source(write_manifest(tmp_path / "m.jsonl", rows))
    assert [len(r) for r in plan_shards(source.rows, 4, 10**9)] == [4, 4, 2]
    assert [len(r) for r in plan_shards(source.rows, 100, 1)] == [1] * 10  # never an empty shard
    report = write_shards(source, tmp_path / "out", maxsize=3 * 7000, progress=False)
    sizes = [(tmp_path / "out" / s).stat().st_size for s in report.shards]
    assert len(sizes) > 1 and max(sizes) <= 3 * 7000 * 1.2


@pytest.mark.parametrize("rows, message", [
    ([{"key": "a.b", "text": "x"}], r"key 'a.b' may hold only"),
    ([{"key": "a", "text": "x"}, {"key": "a", "text": "y"}], r"key 'a' appears in rows 1 and 2"),
    ([{"url": "http://x"}], r"has none of the columns image, text"),
    ([{"image": "s3://bucket/x.jpg"}], r"remote"),
])
def test_manifest_mistakes_are_one_line_errors(tmp_path, rows, message):
    manifest = write_manifest(tmp_path / "m.jsonl", rows)
    with pytest.raises(UserError, match=message) as err:
        write_shards(manifest, tmp_path / "out", progress=False)
    assert str(manifest) in str(err.value) and "\n" not in str(err.value)


def test_bad_json_line_names_the_line(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(UserError, match=r"m.jsonl line 2: invalid JSON"):
        read_source(tmp_path / "m.jsonl")


def test_cli_writes_shards_and_reports_errors_in_one_line(tmp_path, capsys):
    manifest = write_manifest(tmp_path / "m.csv", make_rows(tmp_path, 3))
    (tmp_path / "names.txt").write_text("a\nb\nc\n")
    assert cli_main(["shards", str(manifest), "--out", str(tmp_path / "out"), "--layout", "clip_benchmark",
                     "--classnames", str(tmp_path / "names.txt"), "--maxcount", "2", "--no-progress"]) == 0
    assert "3 samples in 2 shard(s)" in capsys.readouterr().out
    assert (tmp_path / "out/test/nshards.txt").read_text() == "2\n"
    assert cli_main(["shards", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmclip: error: source") and "nope.csv does not exist" in err and err.count("\n") == 1
