"""What each tower needs from the data path: its preprocessors, built from the tower's description."""
from __future__ import annotations

from typing import Callable

from pipeline.config import DataConfig
from pipeline.data.preprocess import AudioClip, ImageTransform, TextTokenizer
from pipeline.errors import UserError


def tower_preprocessors(model, data_cfg: DataConfig, train: bool) -> dict[str, Callable]:
    out = {}
    for modality, tower in model.towers.items():
        p = tower.preprocess
        if modality == "image":
            out[modality] = ImageTransform(p.image_size, p.mean, p.std, train, p.interpolation, p.resize_mode)
        elif modality == "text":
            out[modality] = TextTokenizer(p.context_length, p.hf_tokenizer)
        else:
            if p.sample_rate != data_cfg.audio.sample_rate:
                raise UserError(f"model.towers.audio.options.sample_rate={p.sample_rate} differs from "
                                f"data.audio.sample_rate={data_cfg.audio.sample_rate}; make them equal")
            out[modality] = AudioClip(data_cfg.audio.sample_rate, data_cfg.audio.seconds, train)
    return out
