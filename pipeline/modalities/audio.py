"""Audio: soundfile decode (wav/flac/ogg/mp3), mono, resampled, a fixed-length crop; the log-mel is the tower's."""
from __future__ import annotations

import io
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from pydantic import Field

from pipeline.errors import UserError
from pipeline.modalities.base import Modality, ModalityData, Skip
from pipeline.registry import MODALITIES


class AudioData(ModalityData):
    extensions: list[str] = ["flac", "wav", "mp3", "ogg"]
    sample_rate: int = Field(16000, gt=0)
    seconds: float = Field(2.0, gt=0)


@dataclass
class AudioPreprocess:
    """What an audio tower expects."""

    sample_rate: int


class AudioClip:
    """Resample to `sample_rate`, then exactly `seconds` long: random crop when training, the start
    in eval; clips that are too short are repeated, then zero-padded."""

    dtype = torch.float32

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


@MODALITIES.register("audio", config=AudioData)
class Audio(Modality):
    name = "audio"

    def decode(self, data: bytes, cfg=None) -> tuple[np.ndarray, int]:
        import soundfile

        try:
            wave, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
        except Exception as exc:  # soundfile/libsndfile errors
            raise Skip("corrupt_audio") from exc
        if wave.shape[0] == 0:
            raise Skip("corrupt_audio")
        return wave.mean(axis=1), rate

    def preprocessor(self, spec: AudioPreprocess, cfg: Optional[AudioData], train: bool) -> AudioClip:
        cfg = cfg or AudioData(sample_rate=spec.sample_rate)
        if spec.sample_rate != cfg.sample_rate:
            raise UserError(f"model.towers.audio.options.sample_rate={spec.sample_rate} differs from "
                            f"data.audio.sample_rate={cfg.sample_rate}; make them equal")
        return AudioClip(cfg.sample_rate, cfg.seconds, train)
