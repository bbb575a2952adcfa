"""What each tower needs from the data path: its preprocessors, built from the tower's description."""
from __future__ import annotations

from typing import Callable

from pipeline.config import AudioData
from pipeline.data.preprocess import AudioClip, ImageTransform, TextTokenizer
from pipeline.errors import UserError


def tower_preprocessors(model, audio: AudioData | None, train: bool) -> dict[str, Callable]:
    """`audio` (data.audio) sets clip length; None takes the audio tower's sample rate and the default length."""
    out = {}
    for modality, tower in model.towers.items():
        p = tower.preprocess
        if modality == "image":
            out[modality] = ImageTransform(p.image_size, p.mean, p.std, train, p.interpolation, p.resize_mode)
        elif modality == "text":
            out[modality] = TextTokenizer(p.context_length, p.hf_tokenizer)
        else:
            audio = audio or AudioData(sample_rate=p.sample_rate)
            if p.sample_rate != audio.sample_rate:
                raise UserError(f"model.towers.audio.options.sample_rate={p.sample_rate} differs from "
                                f"data.audio.sample_rate={audio.sample_rate}; make them equal")
            out[modality] = AudioClip(audio.sample_rate, audio.seconds, train)
    return out
