"""Audio: soundfile (wav/flac/ogg/mp3); only the frames a crop needs are decoded, then mono-mixed and resampled.

`decode` reads the header only. The preprocessor picks each crop in the output timeline, reads just
that window of the source (soundfile seeks FLAC, OGG, MP3 and WAV) plus the resampling filter's reach
on both sides, mono-mixes and resamples it: the cost of a crop does not depend on the file's length.
In a local shard the member is not even read: the sample holds a MemberRef, and soundfile seeks in a
window of the shard file (pipeline.data.members), so only the crop's bytes leave the disk. The result
equals the same window of the whole file decoded, mixed and resampled (`resample_poly` is shift-invariant
on the grid where source frame `n * down` is output sample `n * up`, and the margin covers its filter),
up to float32 rounding: 1e-5 is the tested tolerance.

`data.audio.crops: K` takes K crops per sample (random starts when training, evenly spaced in eval);
the audio tower embeds each and averages (input [B, K, T]; K = 1 keeps [B, T]).
"""
from __future__ import annotations

import contextlib
import io
import random
from dataclasses import dataclass
from math import ceil, gcd
from typing import TYPE_CHECKING, Iterator, Optional

import numpy as np
import torch
from pydantic import Field

from pipeline.data.members import MemberRef
from pipeline.errors import UserError
from pipeline.modalities.base import Modality, ModalityData, Skip
from pipeline.registry import MODALITIES

if TYPE_CHECKING:
    from soundfile import SoundFile

FILTER_HALF_WIDTH = 10  # scipy.signal.resample_poly's default window: 10 * max(up, down) taps each side


class AudioData(ModalityData):
    extensions: list[str] = ["flac", "wav", "mp3", "ogg"]
    sample_rate: int = Field(default=16000, gt=0)
    seconds: float = Field(default=2.0, gt=0)
    crops: int = Field(default=1, ge=1, description="crops per sample; the audio embedding is the mean over them")


@dataclass
class AudioPreprocess:
    """What an audio tower expects."""

    sample_rate: int


class EncodedAudio:
    """An audio file (bytes, or a MemberRef into a local shard) whose header is read; `read` decodes a window
    of it, mono-mixed. `frames_read` counts the source frames decoded so far (what a crop costs)."""

    def __init__(self, data: bytes | MemberRef):
        self.data = data
        with self._open() as f:
            self.rate, self.frames = f.samplerate, f.frames
        self.frames_read = 0

    @contextlib.contextmanager
    def _open(self) -> Iterator[SoundFile]:
        import soundfile

        file = self.data.open() if isinstance(self.data, MemberRef) else io.BytesIO(self.data)
        # soundfile reads any object with read/seek/tell (its stubs name only paths and BinaryIO)
        with file, soundfile.SoundFile(file) as f:  # pyright: ignore[reportArgumentType]
            yield f

    def read(self, start: int, stop: int) -> np.ndarray:
        start, stop = max(0, start), min(self.frames, stop)
        try:
            with self._open() as f:
                if start:
                    f.seek(start)
                wave = f.read(stop - start, dtype="float32", always_2d=True)
        except Exception as exc:  # damaged frames behind a valid header
            raise Skip("corrupt_audio") from exc
        self.frames_read += len(wave)
        return wave.mean(axis=1)


class AudioClip:
    """`crops` windows of exactly `seconds` at `sample_rate`: random starts when training, evenly spaced
    (the start alone for one crop) in eval; clips that are too short are repeated. -> [T], or [K, T]."""

    dtype = torch.float32

    def __init__(self, sample_rate: int, seconds: float, train: bool, seed: int = 0, crops: int = 1):
        self.sample_rate, self.train, self.crops = sample_rate, train, crops
        self.length = int(round(sample_rate * seconds))
        self.shape = (self.length,) if crops == 1 else (crops, self.length)
        self.rng = random.Random(seed)

    def __call__(self, audio: EncodedAudio) -> torch.Tensor:
        if audio.frames == 0:
            raise Skip("corrupt_audio")
        g = gcd(audio.rate, self.sample_rate)
        up, down = self.sample_rate // g, audio.rate // g
        total = ceil(audio.frames * up / down)  # resample_poly's output length for the whole file
        if total <= self.length:
            wave = self._window(audio, 0, total, up, down)
            crops = [np.tile(wave, ceil(self.length / len(wave)))[: self.length]] * self.crops
        else:
            crops = [self._window(audio, start, self.length, up, down) for start in self._starts(total, up)]
        stacked = np.stack(crops) if self.crops > 1 else crops[0]
        return torch.from_numpy(np.ascontiguousarray(stacked, dtype=np.float32))

    def _starts(self, total: int, up: int) -> list[int]:
        """Output-timeline starts on multiples of `up`, where output samples fall on whole source frames."""
        last = (total - self.length) // up
        if self.train:
            return [self.rng.randint(0, last) * up for _ in range(self.crops)]
        return [round(i * last / max(1, self.crops - 1)) * up for i in range(self.crops)]

    def _window(self, audio: EncodedAudio, start: int, length: int, up: int, down: int) -> np.ndarray:
        """Output samples [start, start + length), from the source frames they need plus the filter's margin."""
        if up == down:
            return audio.read(start, start + length)
        from scipy.signal import resample_poly

        src_start = start // up * down
        margin = ceil(FILTER_HALF_WIDTH * max(up, down) / up / down) * down + down  # on the source grid
        first = max(0, src_start - margin)
        wave = audio.read(first, src_start + ceil(length * down / up) + margin)
        out = resample_poly(wave, up, down)
        offset = (src_start - first) // down * up
        return out[offset:offset + length].astype(np.float32)


@MODALITIES.register("audio", config=AudioData)
class Audio(Modality):
    name = "audio"
    reads_by_reference = True

    def decode(self, data: bytes | MemberRef, cfg=None) -> EncodedAudio:
        try:
            audio = EncodedAudio(data)
        except Exception as exc:  # soundfile/libsndfile errors
            raise Skip("corrupt_audio") from exc
        if audio.frames == 0:
            raise Skip("corrupt_audio")
        return audio

    def preprocessor(self, spec: AudioPreprocess, cfg: Optional[AudioData], train: bool) -> AudioClip:
        cfg = cfg or AudioData(sample_rate=spec.sample_rate)
        if spec.sample_rate != cfg.sample_rate:
            raise UserError(f"model.towers.audio.options.sample_rate={spec.sample_rate} differs from "
                            f"data.audio.sample_rate={cfg.sample_rate}; make them equal")
        return AudioClip(cfg.sample_rate, cfg.seconds, train, crops=cfg.crops)
