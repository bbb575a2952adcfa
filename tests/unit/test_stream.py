"""The streaming reader: every modality round trip, exact epoch coverage over ranks x workers,
source weights, each corruption kind counted, masks, hard negatives, refused pickles, bad specs."""
import io
import json
import random
from collections import Counter

import numpy as np
import pytest
import soundfile
import torch
import webdataset as wds
from PIL import Image

from helpers.faults import KINDS, damage
from pipeline.data.config import DataConfig
from pipeline.data.loader import build_loader
from pipeline.errors import UserError
from pipeline.modalities.audio import AudioClip
from pipeline.modalities.image import ImageTransform
from pipeline.modalities.text import TextTokenizer


def png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def flac(seconds=0.25, rate=8000) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, np.sin(np.arange(int(seconds * rate)) / 5).astype(np.float32), rate, format="FLAC")
    return buf.getvalue()


def write_shards(folder, prefix, n_shards, per_shard, extra=lambda i: {}):
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {f"{prefix}-{s:06d}.tar": per_shard for s in range(n_shards)}
    (folder / "sizes.json").write_text(json.dumps(sizes))
    for s in range(n_shards):
        with wds.TarWriter(str(folder / f"{prefix}-{s:06d}.tar")) as w:
            for j in range(per_shard):
                i = s * per_shard + j
                sample = {"__key__": f"{prefix}{i:05d}", "png": png(i % 250), "txt": f"caption {i}".encode(),
                          "flac": flac(), "cls": str(i % 7).encode(), "json": json.dumps({"i": i}).encode(),
                          "neg.txt": f"wrong {i}\nalso wrong {i}".encode()}
                sample.update(extra(i))
                w.write({k: v for k, v in sample.items() if v is not None})
    return str(folder / f"{prefix}-{{000000..{n_shards - 1:06d}}}.tar")


def preprocess(train=False):
    return {"image": ImageTransform(8, (0.5,) * 3, (0.5,) * 3, train), "text": TextTokenizer(12),
            "audio": AudioClip(16000, 0.5, train)}


def read_all(cfg, modalities=("image", "text", "audio"), **kw):
    kw.setdefault("split", "val")
    batches = list(build_loader(cfg, modalities=list(modalities), preprocess=preprocess(kw["split"] == "train"), **kw))
    skipped = sum((Counter(b["skipped"]) for b in batches), Counter())
    return batches, skipped


def test_round_trip_every_modality(tmp_path):
    spec = write_shards(tmp_path, "a", 2, 5)
    cfg = DataConfig(train=spec, val=spec, batch_size=4, workers=0, resampled=False,
                     hard_negatives={"k": 3})
    batches, skipped = read_all(cfg, split="val")
    assert not skipped
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == [f"a{i:05d}" for i in range(10)]
    b = batches[0]
    assert b["image"].shape == (4, 3, 8, 8) and b["audio"].shape == (4, 8000) and b["text"].shape == (4, 12)
    i = int(b["key"][0][1:])
    assert b["label"][0].item() == i % 7
    torch.testing.assert_close(b["text"][0], TextTokenizer(12)(f"caption {i}"))
    # 8 kHz clip of 0.25 s resampled to 16 kHz and repeated to 0.5 s
    assert b["audio"][0, :4000].abs().max() > 0.5 and torch.allclose(b["audio"][0, :4000], b["audio"][0, 4000:])
    assert all(m.all() for m in b["mask"].values())

    train_cfg = cfg.model_copy(update={"resampled": True})
    tb = next(iter(build_loader(train_cfg, split="train", modalities=["image", "text"], preprocess=preprocess(True))))
    assert tb["text_neg"].shape == (4, 3, 12)
    k = int(tb["key"][0][1:])
    torch.testing.assert_close(tb["text_neg"][0, 0], TextTokenizer(12)(f"wrong {k}"))
    torch.testing.assert_close(tb["text_neg"][0, 2], TextTokenizer(12)(f"wrong {k}"))  # 2 negatives repeat to k=3


def test_epoch_mode_two_ranks_two_workers_sees_every_sample_once(tmp_path):
    spec = write_shards(tmp_path, "e", 8, 3)
    cfg = DataConfig(train=spec, val=spec, batch_size=2, workers=2, resampled=False)
    seen = []
    for rank in range(2):
        batches, _ = read_all(cfg, modalities=("image", "text"), split="val", rank=rank, world_size=2)
        seen += [k for b in batches for k in b["key"]]
    assert sorted(seen) == sorted(f"e{i:05d}" for i in range(24))


def test_resampled_weights_are_respected(tmp_path):
    a = write_shards(tmp_path / "a", "a", 2, 4)
    b = write_shards(tmp_path / "b", "b", 2, 4)
    cfg = DataConfig(train=f"{a}::{b}", train_weights=[3, 1], batch_size=8, workers=0, shuffle_buffer=0)
    loader = iter(build_loader(cfg, split="train", modalities=["text"], preprocess=preprocess(True), seed=1))
    counts = Counter(k[0] for _ in range(100) for k in next(loader)["key"])
    assert 0.65 < counts["a"] / 800 < 0.85  # expected 0.75; 100 shard draws at a fixed seed


def test_each_corruption_kind_is_counted_and_the_stream_goes_on(tmp_path):
    def damage(i):
        return {0: {"png": b"not a png"}, 1: {"flac": b"fLaC garbage"}, 2: {"json": b"{bad json"},
                3: {"pth": b"\x80\x04pickled"}, 4: {"txt": b"\xff\xfe\xfa"}, 5: {"cls": b"seven"}}.get(i % 10, {})

    spec = write_shards(tmp_path, "c", 2, 10, damage)
    truncated = tmp_path / "c-000001.tar"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    cfg = DataConfig(train=spec, val=spec, batch_size=2, workers=0, resampled=False)
    batches, skipped = read_all(cfg)
    for reason in ("corrupt_image", "corrupt_audio", "bad_json", "pickle_member_refused", "bad_utf8", "bad_label"):
        assert skipped[reason] >= 1, (reason, skipped)
    lost = sum(v for r, v in skipped.items() if r.startswith("read_error") or r == "missing_in_truncated_shard")
    assert lost >= 1, skipped
    good = sum(len(b["key"]) for b in batches)
    assert good >= 4 and good + sum(skipped.values()) >= 20  # every sample is either delivered or counted


@pytest.mark.parametrize("kind", KINDS)
def test_damaged_flac_shards_give_the_same_samples_and_skips_whether_flacs_are_read_by_reference_or_not(
        tmp_path, monkeypatch, kind):
    """A local shard's FLACs reach the decoder unread (MemberRefs): the fault suite's damage must still be
    found and counted under the same reasons as when they were read as bytes."""
    from pipeline.data import loader

    write_shards(tmp_path, "f", 1, 12)
    good = (tmp_path / "f-000000.tar").read_bytes()
    cfg = DataConfig(train=str(tmp_path / "f-000000.tar"), val=str(tmp_path / "f-000000.tar"), batch_size=4,
                     workers=0, resampled=False)

    def outcomes() -> list[tuple[list[str], Counter]]:
        got = []
        for seed in range(4):
            (tmp_path / "f-000000.tar").write_bytes(damage(good, kind, random.Random(seed)))
            batches, skipped = read_all(cfg, modalities=("audio", "text"))
            got.append(([k for b in batches for k in b.get("key", [])], skipped))
        return got

    by_reference = outcomes()
    monkeypatch.setattr(loader, "lazy_extensions", lambda sections: frozenset())
    assert by_reference == outcomes()


def test_missing_modality_mask_or_drop(tmp_path):
    spec = write_shards(tmp_path, "m", 1, 6, lambda i: {"flac": None} if i % 2 else {})
    cfg = DataConfig(train=spec, val=spec, batch_size=6, workers=0, resampled=False)
    (b,), skipped = read_all(cfg)
    assert b["mask"]["audio"].tolist() == [True, False] * 3 and b["mask"]["image"].all()
    assert b["audio"][1].abs().sum() == 0
    dropped = cfg.model_copy(update={"missing_modality": "drop", "batch_size": 1})
    batches, skipped = read_all(dropped)
    assert len(batches) == 3 and skipped == {"missing_audio": 3}


def test_bad_specs_fail_at_start_naming_them(tmp_path):
    with pytest.raises(UserError, match=r"no shards match '.*nothing-\{0\.\.3\}\.tar'"):
        build_loader(DataConfig(train=str(tmp_path / "nothing-{0..3}.tar"), batch_size=2), split="train",
                     modalities=["text"], preprocess=preprocess())
    spec = write_shards(tmp_path, "p", 1, 2)
    with pytest.raises(UserError, match="1 of 2 shards"):
        build_loader(DataConfig(train=spec.replace("000000}", "000001}"), batch_size=2), split="train",
                     modalities=["text"], preprocess=preprocess())


def test_every_sample_carries_its_global_index_from_shard_order_and_counts(demo_shards):
    """sizes.json gives each shard's count; a sample's index is its shard's offset plus its position in it."""
    from pipeline.data.config import DataConfig
    from pipeline.data.loader import build_loader
    from pipeline.modalities.text import TextTokenizer

    shards = demo_shards / "demo/train"
    spec = f"{shards}/train-{{000001..000002}}.tar::{shards}/train-000000.tar"
    cfg = DataConfig(train=spec, batch_size=100, workers=2, resampled=False, shuffle_buffer=0)
    seen = {}
    for batch in build_loader(cfg, split="train", modalities=["text"], preprocess={"text": TextTokenizer(8)}):
        seen.update(zip(batch["key"], batch["index"].tolist()))
    assert len(seen) == 1500 and sorted(seen.values()) == list(range(1500))
    for key, index in seen.items():  # keys number the samples 0..2999 across shards 0..5
        number = int(key.split("_")[1])
        assert index == (number - 500 if number >= 500 else number + 1000), (key, index)


@pytest.mark.parametrize("bufsize,max_bytes", [(50, 10**9), (1000, 2000)])
def test_shuffle_buffer_is_bounded_by_count_and_bytes(bufsize, max_bytes):
    """Every sample comes out once, in a new order, and the buffer never holds more than `bufsize` samples
    or (by at most the two samples read per step) more than `max_bytes` of raw members."""
    import random

    from pipeline.data.loader import shuffled

    sizes = [random.Random(i).choice([10, 100, 400]) for i in range(500)]
    consumed = []

    def source():
        for i, size in enumerate(sizes):
            consumed.append(i)
            yield {"__key__": str(i), "flac": b"x" * size}

    out, peak_count, peak_bytes = [], 0, 0
    for sample in shuffled(source(), bufsize, max_bytes, random.Random(0)):
        held = set(consumed) - {int(s["__key__"]) for s in out}
        peak_count, peak_bytes = max(peak_count, len(held)), max(peak_bytes, sum(sizes[i] for i in held))
        out.append(sample)
    keys = [int(s["__key__"]) for s in out]
    assert sorted(keys) == list(range(len(sizes))) and keys != sorted(keys)
    assert peak_count <= bufsize and peak_bytes <= max_bytes + 2 * max(sizes)
    if max_bytes < 10**9:
        assert peak_count < bufsize  # the bytes bound, not the count, held this buffer


def test_the_shuffle_buffer_counts_a_reference_as_what_it_holds_not_as_the_member():
    """A member left in its local shard (MemberRef) costs the buffer the reference, bytes cost their length:
    a buffer of a thousand minute-long FLACs by reference stays far under the default 512-MiB bound."""
    from pipeline.data.loader import held_bytes
    from pipeline.data.members import MemberRef

    member = 8 * 2**20
    assert held_bytes({"__key__": "k", "flac": b"x" * member}) > member
    assert held_bytes({"__key__": "k", "__url__": "/shards/a.tar", "flac": MemberRef("/shards/a.tar", 512, member)}) < 300
