"""Decode one WebDataset sample (a dict of raw members) into typed values, or say why it is skipped.

Only images (PIL), audio (soundfile), UTF-8 text, JSON and integer labels are decoded; pickled
members (.pyd/.pickle/.pth/.pkl) are refused without being read.
"""
from __future__ import annotations

import io
import json
from typing import Optional

import numpy as np

PICKLE_SUFFIXES = ("pyd", "pickle", "pth", "pkl", "pt")


class Skip(Exception):
    """A sample that cannot be used; `reason` is the counter it is reported under."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _member(sample: dict, extensions: list[str]) -> Optional[tuple[str, bytes]]:
    for ext in extensions:
        if ext in sample:
            return ext, sample[ext]
    return None


def decode_image(data: bytes):
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image.convert("RGB")
    except Exception as exc:  # PIL raises many types for damaged files
        raise Skip("corrupt_image") from exc


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    import soundfile

    try:
        wave, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile/libsndfile errors
        raise Skip("corrupt_audio") from exc
    if wave.shape[0] == 0:
        raise Skip("corrupt_audio")
    return wave.mean(axis=1), rate


def decode_text(data: bytes) -> list[str]:
    try:
        lines = [line.strip() for line in data.decode("utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as exc:
        raise Skip("bad_utf8") from exc
    return lines


def decode_sample(sample: dict, extensions: dict[str, list[str]], text_json_key: str = "text",
                  negatives_ext: Optional[str] = None) -> dict:
    """-> {"key", modality: value (image PIL / audio (wave, rate) / text list[str]), "label", "negatives"}."""
    for name in sample:
        if name.rsplit(".", 1)[-1].lower() in PICKLE_SUFFIXES:
            raise Skip("pickle_member_refused")
    meta = None
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise Skip("bad_json") from exc
    out = {"key": sample.get("__key__", "")}
    if "image" in extensions and (m := _member(sample, extensions["image"])):
        out["image"] = decode_image(m[1])
    if "audio" in extensions and (m := _member(sample, extensions["audio"])):
        out["audio"] = decode_audio(m[1])
    if "text" in extensions:
        m = _member(sample, extensions["text"])
        if m:
            texts = decode_text(m[1])
            if texts:
                out["text"] = texts
        elif isinstance(meta, dict) and isinstance(meta.get(text_json_key), str):
            out["text"] = [meta[text_json_key]]
    if "cls" in sample:
        try:
            out["label"] = int(sample["cls"].decode().strip())
        except (ValueError, UnicodeDecodeError) as exc:
            raise Skip("bad_label") from exc
    if negatives_ext and negatives_ext in sample:
        out["negatives"] = decode_text(sample[negatives_ext])
    return out
