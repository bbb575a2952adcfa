"""Rebuild the embedded demo data in data/ from two Debian packages.

A maintainer runs this once; `make demo` never does (it only reads the committed output):

    apt-get install -y dataset-fashion-mnist espeak-ng
    .venv/bin/python data/build_demo.py

Everything is seeded and archive metadata is fixed, so a rebuild reproduces the committed bytes
(up to the espeak-ng/libsndfile versions). What it writes, and why, is in data/README.md.
"""
from __future__ import annotations

import gzip
import io
import json
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image
from scipy.signal import resample_poly

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DATA = Path(__file__).resolve().parent
SEED = 0
SAMPLE_RATE = 16_000
SPLITS = {"train": ("train", 300), "val": ("train", 50), "test": ("t10k", 50)}  # split: (source file, per class)

# Fashion-MNIST label order. (file slug, name used in captions and classnames.txt, spoken phrase)
CLASSES = [
    ("t_shirt", "t-shirt", "a t-shirt"),
    ("trousers", "pair of trousers", "a pair of trousers"),
    ("pullover", "pullover", "a pullover"),
    ("dress", "dress", "a dress"),
    ("coat", "coat", "a coat"),
    ("sandal", "sandal", "a sandal"),
    ("shirt", "shirt", "a shirt"),
    ("sneaker", "sneaker", "a sneaker"),
    ("bag", "bag", "a bag"),
    ("ankle_boot", "ankle boot", "an ankle boot"),
]

# Training captions. The attribute words are measured on the pixels (see image_attributes), so
# captions differ between images of one class and retrieval has something to find.
CAPTION_TEMPLATES = [
    "a photo of the {c}.",
    "a {tone} {size} {c} on a black background.",
    "a grayscale picture of a {texture} {c}.",
    "{c}, product photo, {tone}, {texture}.",
    "a low resolution photo of a {size} {c}.",
    "a {texture} {tone} {c}.",
]
ATTRIBUTE_WORDS = {"tone": ("dark", "mid-grey", "bright"), "size": ("small", "large"),
                   "texture": ("plain", "patterned")}
ZEROSHOT_TEMPLATES = ["a photo of the {c}.", "a grayscale picture of the {c}.", "the {c}, product photo.",
                      "a low resolution photo of the {c}."]

# (espeak-ng voice, words per minute, pitch 0-99). The last two are held out for the test split.
ENGLISH_VOICES = [("en-us", 150, 50), ("en-us+f3", 170, 70), ("en-gb", 140, 40), ("en-gb+f2", 160, 62),
                  ("en-gb-scotland+m3", 155, 35), ("en-029+f4", 145, 66), ("en-us+m7", 175, 45),
                  ("en-gb-x-rp+f1", 135, 55), ("en-us-nyc+m2", 160, 30), ("en-gb+f5", 150, 75)]
HELD_OUT_ENGLISH = {8, 9}

# Symile set: the text is the class name in the language spoken in the audio. Every entry is
# distinct after lower-casing (tokenizers lower-case), so (class, language) -> text is one-to-one.
LANGUAGES = {  # code: (espeak-ng voice, phrases spoken in the audio, class names in label order)
    "en": ("en-gb", ["hello, how are you?", "thank you very much"],
           ["t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]),
    "de": ("de", ["hallo, wie geht es dir?", "vielen Dank"],
           ["Oberteil", "Hose", "Pulli", "Kleid", "Mantel", "Sandale", "Hemd", "Turnschuh", "Tasche", "Stiefelette"]),
    "fr": ("fr-fr", ["bonjour, comment ça va ?", "merci beaucoup"],
           ["haut", "pantalon", "pull", "robe", "manteau", "nu-pieds", "chemise", "basket", "sac", "bottine"]),
    "es": ("es", ["hola, ¿cómo estás?", "muchas gracias"],
           ["camiseta", "pantalones", "jersey", "vestido", "abrigo", "sandalia", "camisa", "zapatilla", "bolso",
            "botín"]),
    "it": ("it", ["ciao, come stai?", "grazie mille"],
           ["maglietta", "pantaloni", "maglione", "abito", "cappotto", "sandalo", "camicia", "scarpa da ginnastica",
            "borsa", "stivaletto"]),
}
# (voice variant suffix, words per minute, pitch); each is spoken with every phrase. The last is held out.
LANGUAGE_SETTINGS = [("", 150, 50), ("+f2", 165, 65), ("+m3", 140, 38), ("+f4", 155, 72)]
HELD_OUT_SETTING = 3


# ---------------------------------------------------------------------------------------- images
def load_idx(stem: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST IDX files: 16-byte header + 28x28 uint8 images, 8-byte header + uint8 labels."""
    images = np.frombuffer(gzip.open(FASHION_MNIST / f"{stem}-images-idx3-ubyte.gz").read(), np.uint8, offset=16)
    labels = np.frombuffer(gzip.open(FASHION_MNIST / f"{stem}-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
    return images.reshape(-1, 28, 28), labels


def pick_balanced(labels: np.ndarray, per_class: int, rng: np.random.Generator, taken: set[int]) -> np.ndarray:
    """`per_class` random indices of each class not in `taken`, in shuffled order (shards mix classes)."""
    picked = []
    for c in range(len(CLASSES)):
        pool = [i for i in np.flatnonzero(labels == c) if i not in taken]
        picked += list(rng.choice(pool, per_class, replace=False))
    taken.update(picked)
    return rng.permutation(np.array(picked))


def image_attributes(image: np.ndarray) -> np.ndarray:
    """(mean intensity, fraction of frame covered, intensity spread) of the object's pixels."""
    mask = image > 25
    pixels = image[mask].astype(np.float64)
    return np.array([pixels.mean(), mask.mean(), pixels.std()])


def attribute_thresholds(images: np.ndarray, labels: np.ndarray) -> dict[int, list[np.ndarray]]:
    """Per class: tone terciles, size median, texture median - measured on the training split."""
    out = {}
    for c in range(len(CLASSES)):
        a = np.stack([image_attributes(im) for im in images[labels == c]])
        out[c] = [np.quantile(a[:, 0], [1 / 3, 2 / 3]), np.quantile(a[:, 1], [0.5]), np.quantile(a[:, 2], [0.5])]
    return out


def describe(image: np.ndarray, thresholds: list[np.ndarray]) -> dict[str, str]:
    values = image_attributes(image)
    return {name: ATTRIBUTE_WORDS[name][int(np.searchsorted(edges, v))]
            for name, edges, v in zip(("tone", "size", "texture"), thresholds, values, strict=True)}


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    """A gzip'd tar with fixed metadata, so identical content gives identical bytes in git."""
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(payload), 0o644
            tar.addfile(info, io.BytesIO(payload))


# ------------------------------------------------------------------------------------- captions
def captions(c: int, attrs: dict[str, str]) -> list[str]:
    return [t.format(c=CLASSES[c][1], **attrs) for t in CAPTION_TEMPLATES]


def hard_negatives(template: str, c: int, attrs: dict[str, str], rng: np.random.Generator) -> list[str]:
    """Two NegCLIP-style negatives: the class swapped; and one attribute flipped (or a second class swap)."""
    others = [o for o in range(len(CLASSES)) if o != c]
    c1, c2 = rng.choice(others, 2, replace=False)
    negs = [template.format(c=CLASSES[c1][1], **attrs)]
    used = [name for name in ATTRIBUTE_WORDS if "{" + name + "}" in template]
    if used:
        name = used[rng.integers(len(used))]
        flipped = dict(attrs, **{name: rng.choice([w for w in ATTRIBUTE_WORDS[name] if w != attrs[name]])})
        negs.append(template.format(c=CLASSES[c][1], **flipped))
    else:
        negs.append(template.format(c=CLASSES[c2][1], **attrs))
    return negs


# ----------------------------------------------------------------------------------------- audio
def speak(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """espeak-ng at 22.05 kHz -> 16 kHz mono float32 with the leading/trailing silence trimmed."""
    with tempfile.NamedTemporaryFile(suffix=".wav") as wav:
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", wav.name, text],
                       check=True)
        audio, rate = soundfile.read(wav.name, dtype="float32")
    audio = resample_poly(audio, SAMPLE_RATE, rate).astype(np.float32)
    loud = np.flatnonzero(np.abs(audio) > 0.02 * np.abs(audio).max())
    margin = SAMPLE_RATE // 20
    return audio[max(loud[0] - margin, 0): loud[-1] + margin]


def write_flac(path: Path, audio: np.ndarray) -> float:
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return len(audio) / SAMPLE_RATE


def build_english_audio(out: Path) -> dict[int, list[str]]:
    """Each class name spoken in every English voice; returns class -> relative FLAC paths by variant."""
    clips = {}
    for c, (slug, _, phrase) in enumerate(CLASSES):
        clips[c] = []
        for v, (voice, speed, pitch) in enumerate(ENGLISH_VOICES):
            rel = f"audio/{slug}_{v}.flac"
            write_flac(out / rel, speak(phrase, voice, speed, pitch))
            clips[c].append(rel)
    return clips


def build_language_audio(out: Path) -> dict[str, list[str]]:
    """Every phrase in every voice setting, per language; variant = setting * n_phrases + phrase."""
    clips = {}
    for lang, (voice, phrases, _) in LANGUAGES.items():
        clips[lang] = []
        for s, (suffix, speed, pitch) in enumerate(LANGUAGE_SETTINGS):
            for p, phrase in enumerate(phrases):
                rel = f"audio/{lang}_{s * len(phrases) + p}.flac"
                write_flac(out / rel, speak(phrase, voice + suffix, speed, pitch))
                clips[lang].append(rel)
    return clips


def variants_for(split: str, n: int, held_out: set[int]) -> list[int]:
    return sorted(held_out) if split == "test" else [v for v in range(n) if v not in held_out]


# -------------------------------------------------------------------------------------- manifests
def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def fashion_rows(split, picked, images, labels, origin, thresholds, clips, rng) -> list[dict]:
    """Main demo rows. Training splits carry one caption per image; test carries all (for retrieval)."""
    voices = variants_for(split, len(ENGLISH_VOICES), HELD_OUT_ENGLISH)
    rows = []
    for i, idx in enumerate(picked):
        c, attrs = int(labels[idx]), describe(images[idx], thresholds[int(labels[idx])])
        t = int(rng.integers(len(CAPTION_TEMPLATES)))
        rows.append({
            "key": f"{split}_{i:06d}",
            "image": f"images/{split}/{i:06d}.png",
            "text": captions(c, attrs) if split == "test" else captions(c, attrs)[t],
            "audio": clips[c][int(rng.choice(voices))],
            "label": c,
            "neg_text": hard_negatives(CAPTION_TEMPLATES[t], c, attrs, rng),
            "origin": f"fashion-mnist/{origin}/{int(idx)}",
            **attrs,
        })
    return rows


def symile_rows(split: str, fashion: list[dict], clips: dict[str, list[str]], rng) -> list[dict]:
    """Same images; language balanced and shuffled; label = index of the text in symile/classnames.txt."""
    langs = list(LANGUAGES)
    order = rng.permutation(np.resize(np.arange(len(langs)), len(fashion)))
    settings = variants_for(split, len(LANGUAGE_SETTINGS), {HELD_OUT_SETTING})
    rows = []
    for i, (row, lang_index) in enumerate(zip(fashion, order, strict=True)):
        lang_index, c = int(lang_index), row["label"]
        lang = langs[lang_index]
        n_phrases = len(LANGUAGES[lang][1])
        variant = int(rng.choice(settings)) * n_phrases + int(rng.integers(n_phrases))
        rows.append({
            "key": f"symile_{split}_{i:06d}",
            "image": "../fashion_mnist/" + row["image"],
            "text": LANGUAGES[lang][2][c],
            "audio": clips[lang][variant],
            "label": lang_index * len(CLASSES) + c,
            "class": c,
            "language": lang,
        })
    return rows


def check_tables() -> None:
    texts = [name.lower() for _, _, names in LANGUAGES.values() for name in names]
    assert len(set(texts)) == len(texts), "Symile texts must be distinct after lower-casing"
    assert all(len(names) == len(CLASSES) for _, _, names in LANGUAGES.values())


def main() -> None:
    check_tables()
    rng = np.random.default_rng(SEED)
    sources = {stem: load_idx(stem) for stem in ("train", "t10k")}
    taken = {stem: set() for stem in sources}
    picked = {split: pick_balanced(sources[stem][1], n, rng, taken[stem]) for split, (stem, n) in SPLITS.items()}
    train_images, train_labels = sources["train"][0][picked["train"]], sources["train"][1][picked["train"]]
    thresholds = attribute_thresholds(train_images, train_labels)

    fm, sy = DATA / "fashion_mnist", DATA / "symile"
    fm.mkdir(exist_ok=True)
    sy.mkdir(exist_ok=True)
    english, spoken_languages = build_english_audio(fm), build_language_audio(sy)
    pngs = {}
    for split, (stem, _) in SPLITS.items():
        images, labels = sources[stem]
        rows = fashion_rows(split, picked[split], images, labels, stem, thresholds, english, rng)
        for row, idx in zip(rows, picked[split], strict=True):
            pngs[row["image"].removeprefix("images/")] = png_bytes(images[idx])
        write_jsonl(fm / f"{split}.jsonl", rows)
        write_jsonl(sy / f"{split}.jsonl", symile_rows(split, rows, spoken_languages, rng))
    write_tar(fm / "images.tar.gz", pngs)

    write_lines(fm / "classnames.txt", [name for _, name, _ in CLASSES])
    write_lines(fm / "zeroshot_classification_templates.txt", ZEROSHOT_TEMPLATES)
    write_lines(sy / "classnames.txt", [names[c] for _, _, names in LANGUAGES.values() for c in range(len(CLASSES))])
    write_lines(sy / "zeroshot_classification_templates.txt", ["{c}"])
    (sy / "languages.json").write_text(json.dumps(
        {lang: {"voice": v, "phrases": p, "classnames": n} for lang, (v, p, n) in LANGUAGES.items()},
        ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
