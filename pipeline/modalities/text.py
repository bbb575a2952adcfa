"""Text: UTF-8 captions (one per line, or the JSON caption key), open_clip's BPE or a transformers tokenizer."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

import torch
from pydantic import Field

from pipeline.modalities.base import Modality, ModalityData, Skip
from pipeline.registry import MODALITIES


class TextData(ModalityData):
    extensions: list[str] = ["txt"]
    json_key: str = Field("text", description="caption key in KEY.json when no text file exists")


@dataclass
class TextPreprocess:
    """What a text tower expects."""

    context_length: int
    hf_tokenizer: Optional[str] = None  # local path of a transformers tokenizer; None = open_clip BPE


class TextTokenizer:
    dtype = torch.long

    def __init__(self, context_length: int, hf_tokenizer: Optional[str] = None):
        import open_clip

        self.tokenizer = (open_clip.tokenizer.HFTokenizer(hf_tokenizer, context_length=context_length)
                          if hf_tokenizer else open_clip.tokenizer.SimpleTokenizer(context_length=context_length))
        self.shape = (context_length,)

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        """One string -> [L]; a list -> [N, L]."""
        tokens = self.tokenizer([texts] if isinstance(texts, str) else list(texts))
        return tokens[0] if isinstance(texts, str) else tokens


@MODALITIES.register("text", config=TextData)
class Text(Modality):
    name = "text"

    def extract(self, sample: dict, meta: Optional[dict], cfg: TextData):
        data = self.member(sample, cfg)
        if data is not None:
            return self.decode(data, cfg) or None
        if isinstance(meta, dict) and isinstance(meta.get(cfg.json_key), str):
            return [meta[cfg.json_key]]
        return None

    def decode(self, data: bytes, cfg=None) -> list[str]:
        try:
            return [line.strip() for line in data.decode("utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as exc:
            raise Skip("bad_utf8") from exc

    def select(self, value: list[str], rng: random.Random, train: bool):
        """Several captions: a random one to train on, the first to evaluate."""
        return rng.choice(value) if train else value[0]

    def preprocessor(self, spec: TextPreprocess, cfg, train: bool) -> TextTokenizer:
        return TextTokenizer(spec.context_length, spec.hf_tokenizer)
