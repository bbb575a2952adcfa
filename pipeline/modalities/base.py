"""The Modality interface (see the package docstring)."""
from __future__ import annotations

import random
from typing import Any, Optional, Protocol

import torch

from pipeline.section import Section


class Skip(Exception):
    """A sample that cannot be used; `reason` is the counter it is reported under."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Preprocessor(Protocol):
    """Decoded value -> tensor of `shape` and `dtype` (a sample missing the modality gets zeros of both)."""

    shape: tuple
    dtype: torch.dtype

    def __call__(self, value: Any) -> torch.Tensor: ...


class ModalityData(Section):
    """Base of every `data.<modality>` section: which tar members hold the modality."""

    extensions: list[str]


class Modality:
    name: str = ""
    # True when `decode` takes a MemberRef (pipeline.data.members) as well as bytes and reads only the part of
    # the member it needs: local shards then hand this modality's members over unread (pipeline.data.tars).
    reads_by_reference: bool = False

    def member(self, sample: dict, cfg: ModalityData) -> Optional[bytes]:
        for ext in cfg.extensions:
            if ext in sample:
                return sample[ext]
        return None

    def extract(self, sample: dict, meta: Optional[dict], cfg: ModalityData) -> Any:
        """The decoded value of this modality in a raw sample, or None if it has none (raise Skip if damaged)."""
        data = self.member(sample, cfg)
        return None if data is None else self.decode(data, cfg)

    def decode(self, data: bytes, cfg: ModalityData) -> Any:
        raise NotImplementedError

    def select(self, value: Any, rng: random.Random, train: bool) -> Any:
        """One value to use when a sample holds several (e.g. captions); the value itself by default."""
        return value

    def preprocessor(self, spec: Any, cfg: Optional[ModalityData], train: bool) -> Preprocessor:
        """The transform for a tower described by `spec` (its `preprocess`); `cfg` is None in eval."""
        raise NotImplementedError
