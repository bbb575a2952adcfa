"""Realistic benchmark data, synthesised offline from what ships in data/ (no download).

The demo's 28-px images and 1-s speech clips cost nothing to decode, so they say little about a loader
on real data. This builds, once (cached under `data/shards/realistic`, gitignored):

- images/: photo-like JPEGs. Each is a smooth random colour field (a few random colours at coarse
  and finer scale, bicubic-upsampled), one to three Fashion-MNIST items composited on it at random
  positions and scales (20-70% of the short side), each tinted a random colour with its grey level as
  alpha, plus Gaussian luminance grain of sigma `NOISE_GREY` grey levels drawn at half resolution and
  bilinearly upsampled (demosaiced sensor noise: what makes a JPEG of a photo as large as a photo's;
  white per-pixel noise of that sigma gives files above web photos' sizes); 480-800 px wide (aspect 4:3,
  3:2 or 1:1), quality 90. The caption
  is the first item's demo caption. `summary.json` records the mean file size (web photos: 40-120 KB).
- audio10/, audio60/: 48 kHz stereo FLACs of 10 s and 60 s: the demo's espeak class names one after
  another with 0.2-1 s gaps, upsampled from 16 kHz, a different gain and a sub-millisecond delay per
  channel, plus white noise at about -40 dBFS. The caption names the spoken classes.

All are written with the shard writer (pipeline.data.writer), so they carry sizes.json like any shard set.
"""
from __future__ import annotations

import io
import json
import shutil
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from pipeline.data.writer import write_shards

REPO_DATA = Path(__file__).resolve().parents[2] / "data"
RECIPE = 1  # bump when the recipe changes: a cache built by another recipe is rebuilt
N_IMAGES, IMAGES_PER_SHARD = 600, 200
N_AUDIO, AUDIO_PER_SHARD = 24, 12
NOISE_GREY = 12.0
AUDIO_RATE, SPEECH_RATE = 48000, 16000
AUDIO_NOISE = 0.01


def build_realistic(out_root: str | Path = "data/shards/realistic", data_root: str | Path = REPO_DATA,
                    n_images: int = N_IMAGES, n_audio: int = N_AUDIO, progress: bool = False) -> dict:
    """Build the sets unless a cache of this recipe and size exists; returns `summary.json` (shard specs, sizes)."""
    out, data_root = Path(out_root), Path(data_root)
    stamp = out / "summary.json"
    wanted = {"recipe": RECIPE, "n_images": n_images, "n_audio": n_audio}
    if stamp.is_file():
        summary = json.loads(stamp.read_text())
        if {k: summary.get(k) for k in wanted} == wanted:
            return summary
    if out.exists():
        shutil.rmtree(out)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp)
        image_bytes = _write_images(raw, data_root, n_images, rng)
        write_shards(raw / "images.jsonl", out / "images", prefix="train", maxcount=IMAGES_PER_SHARD,
                     progress=progress)
        for seconds in (10, 60):
            _write_audio(raw, data_root, seconds, n_audio, rng)
            write_shards(raw / f"audio{seconds}.jsonl", out / f"audio{seconds}", prefix="train",
                         maxcount=AUDIO_PER_SHARD, progress=progress)
    summary = {**wanted, "mean_jpeg_kb": round(float(np.mean(image_bytes)) / 1024, 1),
               "images": _spec(out / "images", n_images, IMAGES_PER_SHARD),
               "audio10": _spec(out / "audio10", n_audio, AUDIO_PER_SHARD),
               "audio60": _spec(out / "audio60", n_audio, AUDIO_PER_SHARD)}
    stamp.write_text(json.dumps(summary, indent=2))
    return summary


def _spec(folder: Path, n: int, per_shard: int) -> str:
    return str(folder / f"train-{{000000..{(n - 1) // per_shard:06d}}}.tar")


def _demo_items(data_root: Path) -> list[tuple[np.ndarray, str]]:
    """(28x28 grey image, caption) of the demo train set, read from the committed archive."""
    rows = [json.loads(line) for line in (data_root / "fashion_mnist/train.jsonl").read_text().splitlines()]
    captions = {r["image"].removeprefix("images/"): r["text"] for r in rows}
    from PIL import Image

    items = []
    with tarfile.open(data_root / "fashion_mnist/images.tar.gz") as tar:
        for member in tar:
            if member.name in captions:
                file = tar.extractfile(member)
                assert file is not None, member.name  # a regular file: the captions name image files
                grey = np.asarray(Image.open(io.BytesIO(file.read())).convert("L"))
                items.append((grey, captions[member.name]))
    return items


def photo_like(items: list[np.ndarray], rng: np.random.Generator):
    """One synthetic photo, a PIL image (see the module docstring)."""
    from PIL import Image

    width = int(rng.integers(480, 801))
    height = int(round(width * rng.choice([3 / 4, 2 / 3, 1.0])))
    canvas = np.zeros((height, width, 3), np.float32)
    for cells, amplitude in ((3, 1.0), (12, 0.25)):
        coarse = rng.uniform(0, 255, (cells, cells + 1, 3)).astype(np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.float32)
        canvas += amplitude * (field - 128)
    canvas = canvas / 1.25 + 128
    for grey in items:
        side = int(min(width, height) * rng.uniform(0.2, 0.7))
        patch = np.asarray(Image.fromarray(grey).resize((side, side), Image.Resampling.BICUBIC), np.float32) / 255
        y, x = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
        alpha = np.clip(patch * 1.5, 0, 1)[..., None]
        colour = rng.uniform(0, 255, 3).astype(np.float32) * (0.4 + 0.6 * patch[..., None])
        region = canvas[y:y + side, x:x + side]
        canvas[y:y + side, x:x + side] = region * (1 - alpha) + colour * alpha
    grain = rng.standard_normal((height // 2, width // 2), dtype=np.float32)
    grain = np.asarray(Image.fromarray(grain, mode="F").resize((width, height), Image.Resampling.BILINEAR))
    canvas += (NOISE_GREY / grain.std()) * grain[..., None]
    return Image.fromarray(np.clip(canvas, 0, 255).round().astype(np.uint8))


def _write_images(raw: Path, data_root: Path, n: int, rng: np.random.Generator) -> list[int]:
    items = _demo_items(data_root)
    folder = raw / "images"
    folder.mkdir()
    sizes, rows = [], []
    for i in range(n):
        picks = [items[int(j)] for j in rng.integers(0, len(items), int(rng.integers(1, 4)))]
        path = folder / f"{i:06d}.jpg"
        photo_like([grey for grey, _ in picks], rng).save(path, quality=90)
        sizes.append(path.stat().st_size)
        rows.append({"key": f"photo_{i:06d}", "image": f"images/{path.name}", "text": picks[0][1]})
    (raw / "images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return sizes


def _speech_clips(data_root: Path) -> list[tuple[np.ndarray, str]]:
    import soundfile

    clips = []
    for path in sorted((data_root / "fashion_mnist/audio").glob("*.flac")):
        wave, rate = soundfile.read(path, dtype="float32", always_2d=True)
        assert rate == SPEECH_RATE, path
        clips.append((wave.mean(axis=1), path.stem.rsplit("_", 1)[0].replace("_", " ")))
    return clips


def speech_track(clips: list[tuple[np.ndarray, str]], seconds: float, rng: np.random.Generator
                 ) -> tuple[np.ndarray, list[str]]:
    """[frames, 2] float32 at AUDIO_RATE (see the module docstring) and the spoken class names."""
    from scipy.signal import resample_poly

    mono = np.zeros(int(seconds * SPEECH_RATE), np.float32)
    at, words = 0, []
    while True:
        wave, word = clips[int(rng.integers(len(clips)))]
        if at + len(wave) > len(mono):
            break
        mono[at:at + len(wave)] = wave
        words.append(word)
        at += len(wave) + int(rng.uniform(0.2, 1.0) * SPEECH_RATE)
    up = resample_poly(mono, AUDIO_RATE // SPEECH_RATE, 1)
    delay = int(rng.integers(1, 24))
    stereo = np.stack([up * rng.uniform(0.6, 0.9), np.roll(up, delay) * rng.uniform(0.6, 0.9)], axis=1)
    stereo += rng.normal(0, AUDIO_NOISE, stereo.shape)
    return np.clip(stereo, -1, 1).astype(np.float32), words


def _write_audio(raw: Path, data_root: Path, seconds: int, n: int, rng: np.random.Generator) -> None:
    import soundfile

    clips = _speech_clips(data_root)
    folder = raw / f"audio{seconds}"
    folder.mkdir()
    rows = []
    for i in range(n):
        track, words = speech_track(clips, seconds, rng)
        path = folder / f"{i:04d}.flac"
        soundfile.write(path, track, AUDIO_RATE, format="FLAC", subtype="PCM_16")
        rows.append({"key": f"speech{seconds}_{i:04d}", "audio": f"audio{seconds}/{path.name}",
                     "text": "spoken: " + ", ".join(words[:8])})
    (raw / f"audio{seconds}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
