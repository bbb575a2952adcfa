"""The decode paths built for real file sizes: reduced-scale JPEG decode and uint8 crops normalised by the
tower; audio crops that decode only their own frames (exact against a full decode); K crops per sample."""
import io
import random
import tarfile

import numpy as np
import pytest
import soundfile
import torch
import webdataset as wds
from PIL import Image as PILImage
from scipy.signal import resample_poly

from pipeline.data.config import DataConfig
from pipeline.data.loader import build_loader
from pipeline.modalities.audio import Audio, AudioClip
from pipeline.modalities.base import Skip
from pipeline.modalities.image import OPENAI_MEAN, OPENAI_STD, Image, ImageTransform, normalize_uint8
from pipeline.modalities.text import TextTokenizer
from pipeline.models import build_tower
from pipeline.models.config import TowerConfig

AUDIO_TOLERANCE = 1e-5  # documented in pipeline.modalities.audio: equal up to float32 rounding


def jpeg(width: int, height: int, seed: int = 0, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    image = PILImage.fromarray(coarse).resize((width, height), PILImage.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format=fmt, quality=90)
    return buf.getvalue()


def flac(seconds: float, rate: int = 48000, seed: int = 0) -> bytes:
    wave = np.random.default_rng(seed).uniform(-0.5, 0.5, (int(seconds * rate), 2)).astype(np.float32)
    buf = io.BytesIO()
    soundfile.write(buf, wave, rate, format="FLAC")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ images
@pytest.mark.parametrize("size, fmt, decoded", [((640, 480), "JPEG", (320, 240)),  # >= 2x the crop: 1/2 scale
                                                ((1000, 920), "JPEG", (250, 230)),  # >= 4x: 1/4 scale
                                                ((400, 300), "JPEG", (400, 300)),  # < 2x: full decode
                                                ((640, 480), "PNG", (640, 480))])  # no DCT scale in PNG
def test_train_crops_decode_large_jpegs_at_reduced_scale_only(size, fmt, decoded):
    image = Image().decode(jpeg(*size, fmt=fmt), None)
    assert image.size == size  # decode read the header only
    crop = ImageTransform(224, OPENAI_MEAN, OPENAI_STD, train=True)(image)
    assert image.size == decoded
    assert crop.dtype == torch.uint8 and crop.shape == (3, 224, 224)
    evaluated = Image().decode(jpeg(*size, fmt=fmt), None)
    assert ImageTransform(224, OPENAI_MEAN, OPENAI_STD, train=False)(evaluated).dtype == torch.float32
    assert evaluated.size == size  # eval decodes in full: exact open_clip preprocessing


def test_channel_last_stacking_equals_stacking_the_crops():
    """Crops (channel-last views) and a contiguous placeholder stack to exactly torch.stack's values."""
    from pipeline.modalities.image import stack_channels_last

    ours = ImageTransform(32, OPENAI_MEAN, OPENAI_STD, train=True)
    crops = [ours(Image().decode(jpeg(60, 50, seed), None)) for seed in range(3)] + [torch.zeros(ours.shape,
                                                                                                   dtype=torch.uint8)]
    assert torch.equal(stack_channels_last(crops), torch.stack(crops))


def test_uint8_batch_normalised_by_the_tower_equals_open_clips_float_train_transform():
    """Same crop (same torch seed, no draft: source < 2x crop): uint8 + tower normalisation == ToTensor+Normalize."""
    from open_clip.transform import image_transform

    tower = build_tower("image", TowerConfig(kind="open_clip_vision", options={
        "image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16}), 16).eval()
    reference = image_transform(32, is_train=True, mean=OPENAI_MEAN, std=OPENAI_STD)
    ours = ImageTransform(32, OPENAI_MEAN, OPENAI_STD, train=True)
    sources = [jpeg(60, 50, seed) for seed in range(4)]
    torch.manual_seed(0)
    uint8 = torch.stack([ours(Image().decode(s, None)) for s in sources])
    torch.manual_seed(0)
    floats = torch.stack([reference(PILImage.open(io.BytesIO(s))) for s in sources])
    assert uint8.dtype == torch.uint8
    torch.testing.assert_close(normalize_uint8(uint8, OPENAI_MEAN, OPENAI_STD, torch.float32), floats,
                               atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(tower(uint8), tower(floats), atol=1e-5, rtol=1e-5)


def test_damaged_jpeg_data_is_corrupt_image_whether_header_or_pixels():
    with pytest.raises(Skip, match="corrupt_image"):
        Image().decode(b"\xff\xd8 not a jpeg", None)
    data = jpeg(640, 480)
    truncated = data[: len(data) // 2]  # the header parses, the pixels do not
    image = Image().decode(truncated, None)
    for train in (True, False):
        with pytest.raises(Skip, match="corrupt_image"):
            ImageTransform(112, OPENAI_MEAN, OPENAI_STD, train=train)(Image().decode(truncated, None))
    assert image.size == (640, 480)


# ------------------------------------------------------------------------------------------------- audio
def full_decode(data: bytes, rate: int) -> np.ndarray:
    wave, source_rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    from math import gcd

    g = gcd(source_rate, rate)
    return resample_poly(wave.mean(axis=1), rate // g, source_rate // g)


@pytest.mark.parametrize("source_rate, rate", [(48000, 16000), (44100, 48000), (16000, 16000)])
def test_audio_crop_equals_the_same_window_of_a_full_decode(source_rate, rate):
    data = flac(6.0, source_rate)
    reference = full_decode(data, rate)
    clip = AudioClip(rate, 1.0, train=True, seed=3)
    for _ in range(3):
        state = clip.rng.getstate()
        crop = clip(Audio().decode(data)).numpy()
        clip.rng.setstate(state)
        (start,) = clip._starts(len(reference), 160 if (source_rate, rate) == (44100, 48000) else 1)
        assert start > 0
        np.testing.assert_allclose(crop, reference[start:start + clip.length], atol=AUDIO_TOLERANCE, rtol=0)
    evenly = AudioClip(rate, 1.0, train=False, crops=3)(Audio().decode(data)).numpy()
    np.testing.assert_allclose(evenly[0], reference[:rate], atol=AUDIO_TOLERANCE, rtol=0)
    np.testing.assert_allclose(evenly[2], reference[-rate:], atol=AUDIO_TOLERANCE, rtol=0)


def test_an_audio_crop_reads_the_same_frames_from_a_short_and_a_long_file():
    clip = AudioClip(16000, 1.0, train=True)
    read = {}
    for seconds in (3, 30):
        audio = Audio().decode(flac(seconds))
        clip(audio)
        read[seconds] = audio.frames_read
    crop_frames = 48000  # 1 s at the source rate
    assert read[3] == read[30] and crop_frames <= read[30] < 1.01 * crop_frames  # crop + the filter's margin


@pytest.mark.parametrize("split", ["train", "val"])
def test_long_flacs_of_a_local_shard_are_read_only_where_the_crops_are_and_crop_as_their_bytes_do(
        tmp_path, monkeypatch, split):
    """The loader hands a local shard's FLACs to the decoder unread (MemberRefs); its crops equal, sample for
    sample and bit for bit, the crops the same seed makes from the members' bytes, and what it reads of each
    12-s member (header, seeks, a 1-s crop) is under a quarter of it. Eval's reader does the same."""
    from pipeline.data import loader
    from pipeline.data.members import MemberRef
    from pipeline.eval.datasets import iter_batches, open_eval_set

    shard = tmp_path / "long.tar"
    with wds.TarWriter(str(shard)) as w:
        for i in range(4):
            w.write({"__key__": f"s{i}", "flac": flac(12.0, seed=i), "txt": b"speech"})
    with tarfile.open(shard) as tar:
        member_sizes = {m.offset_data: m.size for m in tar if m.name.endswith(".flac")}
    cfg = DataConfig(train=str(shard), val=str(shard), batch_size=2, workers=0, resampled=False, shuffle_buffer=4)

    def crops() -> tuple[list[str], torch.Tensor]:
        clip = AudioClip(16000, 1.0, train=split == "train")
        batches = list(build_loader(cfg, split=split, modalities=["audio"], preprocess={"audio": clip}))
        return [k for b in batches for k in b["key"]], torch.cat([b["audio"] for b in batches])

    views, open_view = [], MemberRef.open
    monkeypatch.setattr(MemberRef, "open", lambda ref: views.append(open_view(ref)) or views[-1])
    keys, lazily = crops()
    read = {offset: sum(v.bytes_read for v in views if v.start == offset) for offset in member_sizes}
    assert all(0 < read[offset] < size / 4 for offset, size in member_sizes.items()), (read, member_sizes)
    if split == "val":
        views.clear()
        evaluated = next(iter_batches(open_eval_set(str(shard), "zeroshot_retrieval"), ["audio"],
                                      {"audio": AudioClip(16000, 1.0, train=False)}, 4))
        assert views and torch.equal(evaluated["audio"], lazily)

    views.clear()
    monkeypatch.setattr(loader, "lazy_extensions", lambda sections: frozenset())  # members read as bytes
    eager_keys, eagerly = crops()
    assert eager_keys == keys and torch.equal(eagerly, lazily) and not views


def test_short_audio_is_repeated_to_the_crop_length():
    crop = AudioClip(16000, 1.0, train=True)(Audio().decode(flac(0.25, 16000))).numpy()
    np.testing.assert_array_equal(crop[:4000], crop[4000:8000])


def test_k_crops_give_k_by_t_inputs_and_the_tower_averages_their_embeddings():
    clip = AudioClip(16000, 0.5, train=True, crops=3)
    crops = torch.stack([clip(Audio().decode(flac(4.0, seed=s))) for s in range(2)])
    assert clip.shape == (3, 8000) and crops.shape == (2, 3, 8000)
    assert not torch.equal(crops[0, 0], crops[0, 1])  # three random windows
    tower = build_tower("audio", TowerConfig(kind="timm_audio", name="resnet10t",
                                             options={"sample_rate": 16000, "n_mels": 32}), 16).eval()
    with torch.no_grad():
        per_crop = torch.stack([tower(crops[:, k]) for k in range(3)], 1)
        torch.testing.assert_close(tower(crops), per_crop.mean(1), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------- placeholders
def test_missing_modalities_are_masked_zeros_of_the_uint8_and_k_crop_shapes(tmp_path):
    with wds.TarWriter(str(tmp_path / "mixed.tar")) as w:
        for i in range(4):
            sample = {"__key__": f"s{i}", "txt": f"caption {i}".encode()}
            if i % 2:
                sample["jpg"] = jpeg(300, 240, i)
            else:
                sample["flac"] = flac(1.0, 16000, i)
            w.write(sample)
    cfg = DataConfig(train=str(tmp_path / "mixed.tar"), batch_size=4, workers=0, shuffle_buffer=0,
                     audio={"sample_rate": 16000, "seconds": 0.25, "crops": 2})
    preprocess = {"image": ImageTransform(32, OPENAI_MEAN, OPENAI_STD, train=True), "text": TextTokenizer(8),
                  "audio": AudioClip(16000, 0.25, train=True, crops=cfg.modality("audio").crops)}
    random.seed(0)
    batch = next(iter(build_loader(cfg, split="train", modalities=["image", "text", "audio"], preprocess=preprocess)))
    has_image = torch.tensor([int(k[1:]) % 2 == 1 for k in batch["key"]])
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (4, 3, 32, 32)
    assert batch["image"].is_contiguous(memory_format=torch.channels_last)  # stacked as PIL holds pixels
    assert batch["audio"].shape == (4, 2, 4000)
    assert torch.equal(batch["mask"]["image"], has_image) and torch.equal(batch["mask"]["audio"], ~has_image)
    assert not batch["image"][~has_image].any() and not batch["audio"][has_image].any()
    assert batch["image"][has_image].any() and batch["audio"][~has_image].abs().sum() > 0
