"""Per-modality preprocessing: decoded sample value -> fixed-shape tensor.

Each preprocessor knows its output `shape`, so a sample missing that modality can be padded with
zeros (and masked) without looking at other samples. Images use open_clip's transforms (train
augmentation vs eval), text open_clip's bundled BPE tokenizer or a transformers tokenizer from
a local path, audio a fixed-length waveform (the log-mel front end lives in the model).
"""
from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch


class ImageTransform:
    def __init__(self, image_size: int, mean, std, train: bool, interpolation: str = "bicubic",
                 resize_mode: str = "shortest"):
        from open_clip.transform import image_transform

        self.transform = image_transform(image_size, is_train=train, mean=tuple(mean), std=tuple(std),
                                         interpolation=interpolation, resize_mode=resize_mode)
        self.shape = (3, image_size, image_size)

    def __call__(self, image) -> torch.Tensor:
        return self.transform(image)


class TextTokenizer:
    def __init__(self, context_length: int, hf_tokenizer: Optional[str] = None):
        import open_clip

        self.tokenizer = (open_clip.tokenizer.HFTokenizer(hf_tokenizer, context_length=context_length)
                          if hf_tokenizer else open_clip.tokenizer.SimpleTokenizer(context_length=context_length))
        self.shape = (context_length,)

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        """One string -> [L]; a list -> [N, L]."""
        tokens = self.tokenizer([texts] if isinstance(texts, str) else list(texts))
        return tokens[0] if isinstance(texts, str) else tokens


class AudioClip:
    """Resample to `sample_rate`, then exactly `seconds` long: random crop when training, the start
    in eval; clips that are too short are repeated, then zero-padded."""

    def __init__(self, sample_rate: int, seconds: float, train: bool, seed: int = 0):
        self.sample_rate, self.train = sample_rate, train
        self.length = int(round(sample_rate * seconds))
        self.shape = (self.length,)
        self.rng = random.Random(seed)

    def __call__(self, decoded: tuple[np.ndarray, int]) -> torch.Tensor:
        from math import gcd

        from scipy.signal import resample_poly

        wave, rate = decoded
        if rate != self.sample_rate:
            g = gcd(rate, self.sample_rate)
            wave = resample_poly(wave, self.sample_rate // g, rate // g).astype(np.float32)
        if len(wave) == 0:
            raise ValueError("empty audio")
        if len(wave) < self.length:
            wave = np.tile(wave, int(np.ceil(self.length / len(wave))))[: self.length]
        elif len(wave) > self.length:
            start = self.rng.randrange(len(wave) - self.length + 1) if self.train else 0
            wave = wave[start:start + self.length]
        return torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))
