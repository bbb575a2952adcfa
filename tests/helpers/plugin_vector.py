"""A fourth modality in one file, loaded through `plugins:`: float vectors stored as `.npy` members.

It brings its data section (`data.vector`), its decoding (numpy without pickle), its preprocessing,
and a tower kind that accepts it (`mlp_vector`). Nothing in the package names it.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import Field
from torch import nn

from pipeline.modalities.base import Modality, ModalityData, Skip
from pipeline.models.config import TowerConfig
from pipeline.models.towers import Tower
from pipeline.registry import MODALITIES, TOWERS


class VectorData(ModalityData):
    extensions: list[str] = ["npy"]
    noise: float = Field(0.0, ge=0, description="Gaussian noise added in training")


@dataclass
class VectorInput:
    """What a vector tower expects: vectors of `dim` floats."""

    dim: int


class VectorPreprocess:
    dtype = torch.float32

    def __init__(self, dim: int, noise: float, train: bool):
        self.shape, self.noise, self.train = (dim,), noise, train

    def __call__(self, value: np.ndarray) -> torch.Tensor:
        if value.shape != self.shape:
            raise ValueError(f"expected a vector of shape {self.shape}, got {value.shape}")
        x = torch.from_numpy(value.astype(np.float32))
        return x + self.noise * torch.randn_like(x) if self.train and self.noise else x


@MODALITIES.register("vector", config=VectorData)
class Vector(Modality):
    name = "vector"

    def decode(self, data: bytes, cfg=None) -> np.ndarray:
        try:
            return np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as exc:  # numpy raises ValueError/OSError for damaged or pickled arrays
            raise Skip("corrupt_vector") from exc

    def preprocessor(self, spec: VectorInput, cfg, train: bool) -> VectorPreprocess:
        return VectorPreprocess(spec.dim, cfg.noise if cfg else 0.0, train)


@TOWERS.register("mlp_vector", modality="vector")
def mlp_vector(cfg: TowerConfig, embed_dim: int) -> Tower:
    dim, hidden = int(cfg.options.get("dim", 16)), int(cfg.options.get("hidden", 64))
    encoder = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))
    return Tower(cfg.kind, encoder, VectorInput(dim))
