"""MultiModalCLIP: towers of any registered modalities in one shared embedding space."""
from __future__ import annotations

import math
from typing import Optional, cast

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.batch import Batch, Features
from pipeline.models.config import ModelConfig
from pipeline.models.towers import Tower, build_tower

MAX_LOG_SCALE = math.log(100.0)  # as in CLIP: a multiplier above 100 destabilises training


class MultiModalCLIP(nn.Module):
    """Towers + learnable logit scale (and bias for the sigmoid loss).

    A sample whose modality is absent (presence mask off) gets that modality's learned
    "missing" embedding instead of its encoding, as in Symile: the loss stays well defined
    for every row and the model learns what absence means.
    """

    def __init__(self, towers: dict[str, Tower], embed_dim: int, init_logit_scale: float = math.log(1 / 0.07),
                 init_logit_bias: Optional[float] = None):
        super().__init__()
        self.embed_dim = embed_dim
        self.towers = nn.ModuleDict(towers)
        # Shape [1], not []: DeepSpeed broadcasts parameters as byte views, which 0-dim tensors cannot give.
        self.logit_scale = nn.Parameter(torch.full((1,), float(init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.full((1,), float(init_logit_bias))) if init_logit_bias is not None else None
        self.missing = nn.ParameterDict(
            {m: nn.Parameter(F.normalize(torch.randn(embed_dim), dim=0)) for m in towers}
        )

    @property
    def modalities(self) -> list[str]:
        return sorted(self.towers)

    def inputs(self) -> dict:
        """What each tower takes, for the data path to build its preprocessing (pipeline.modalities.preprocess)."""
        return {m: tower.preprocess for m, tower in self.towers.items()}

    def encode(self, modality: str, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = self.towers[modality](x)
        return F.normalize(features, dim=-1) if normalize else features

    # open_clip's API, for code written against it (image and text are what that format defines)
    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.encode("image", images, normalize)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.encode("text", tokens, normalize)

    def forward(self, batch: Batch) -> Features:
        """Normalised features per modality for a batch (pipeline.batch).

        Also returns `logit_scale` (exponentiated) and `logit_bias` as fresh tensors: under ZeRO-3 the
        parameters themselves are only materialised inside forward, so the loss must get them from here.
        """
        masks = batch.get("mask", {})  # the trainer leaves out masks of modalities every sample has
        out: dict[str, torch.Tensor] = {}
        for m in self.modalities:
            features = self.encode(m, batch[m])
            mask = masks.get(m)
            if mask is not None:  # no branch on the mask's values: a compiled forward could not trace it
                missing = F.normalize(self.missing[m], dim=0).to(features.dtype)
                features = torch.where(mask.to(features.device)[:, None], features, missing.expand_as(features))
            out[m] = features
        for m in self.modalities:
            neg = batch.get(f"{m}_neg")
            if neg is not None:  # [B, K, ...] hard negatives, encoded by the same tower
                b, k = neg.shape[:2]
                out[f"{m}_neg"] = self.encode(m, neg.flatten(0, 1)).view(b, k, -1)
        out["logit_scale"] = self.logit_scale.clamp(max=MAX_LOG_SCALE).exp().squeeze(0)
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias.squeeze(0) * 1.0
        return cast(Features, out)  # per-modality keys besides the scalars: see pipeline.batch


def build_model(cfg: ModelConfig) -> MultiModalCLIP:
    towers = {m: build_tower(m, t, cfg.embed_dim) for m, t in cfg.towers.items()}
    return MultiModalCLIP(towers, cfg.embed_dim, cfg.init_logit_scale, cfg.init_logit_bias)
