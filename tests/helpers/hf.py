"""Export tests' shared pieces: narrow demo towers, awkward texts, perturbed models, demo images as files."""
import tarfile
from io import BytesIO

import torch
from PIL import Image

from helpers.paths import ROOT
from helpers.tiny_bert import tiny_bert
from pipeline.models import build_model
from pipeline.models.config import ModelConfig

TEXTS = ["a photo of a t-shirt/top.", "an ankle boot", "Café crème, déjà vu: naïve Ångström", "日本語のテキスト",
         "Ελληνικά και русский", "a dog 🐶 and a cat 🐱 👍🏽", "TABS\tand   spaces\nnewline",
         " ".join(["a very long caption that goes on"] * 12)]


IMAGE = {"kind": "open_clip_vision", "options": {"image_size": 28, "patch_size": 7, "width": 32, "layers": 2,
                                                 "head_width": 16, "mean": [0.5] * 3, "std": [0.5] * 3}}


TEXT = {"kind": "open_clip_text", "options": {"context_length": 24, "width": 32, "heads": 2, "layers": 2}}


def perturbed(cfg: ModelConfig, seed: int = 0):
    """Random init plus noise on every tensor, so LayerNorms and biases are not their 1/0 init (a swap shows)."""
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def unit(x):
    return torch.nn.functional.normalize(x.float(), dim=-1)


def save_pngs(tmp_path, shapes):
    """Demo images (28x28 grey) at several sizes and modes, as files the processor reads."""

    with tarfile.open(ROOT / "data" / "fashion_mnist" / "images.tar.gz") as archive:
        originals = [Image.open(BytesIO(archive.extractfile(m).read())).copy()
                     for m in archive.getmembers()[:40] if m.isfile()][:len(shapes)]
    paths = []
    for i, (image, shape) in enumerate(zip(originals, shapes)):
        image = image if shape is None else image.resize(shape, Image.BICUBIC)
        path = tmp_path / f"img{i}.png"
        (image.convert("RGB") if i % 2 else image).save(path)
        paths.append(path)
    return paths


def bert(tmp_path):
    # every Fashion-MNIST class name in words of its own: classes made of [UNK] alone score exactly alike, and
    # which of two tied classes comes fifth is then a matter of float rounding
    return tiny_bert(tmp_path / "bert", ["a", "photo", "of", "bag", "dress", "boot", "an", "ankle", "t", "-", "shirt",
                                         "pair", "trousers", "pullover", "coat", "sandal", "sneaker"])
