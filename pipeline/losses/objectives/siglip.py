"""Sigmoid pairwise loss (SigLIP), tiled: every pair is an independent binary decision."""
from __future__ import annotations

from typing import Literal, Optional

import torch

from pipeline.errors import UserError
from pipeline.losses.base import PairwiseLoss
from pipeline.losses.comm import gather_with_grad, global_sum
from pipeline.losses.config import LossSection
from pipeline.losses.objectives.mined_negatives import MinedNegativesConfig
from pipeline.losses.tiles import SigmoidPairs, TileSpec
from pipeline.registry import LOSSES


def siglip_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor, *,
                chunk_size: int | None = None, hard_negatives: torch.Tensor | None = None,
                compute_dtype: str = "auto", distributed: str = "auto", group=None) -> torch.Tensor:
    """−(1/B) Σ_ij log σ(z_ij·(s·a_i·b_j + bias)); equals `open_clip.loss.SigLipLoss()(a, b, s, bias)`.

    `hard_negatives` [B, K, D] add K negative pairs per row. `compute_dtype` and `distributed` as
    in `clip_loss`.
    With `group`, each rank passes its local rows; every rank returns the GLOBAL loss value, and
    gradients flow only into this rank's share (summed over ranks: the single-process gradient).
    """
    spec = TileSpec.resolve(a.device, chunk_size, compute_dtype, distributed, group)
    local = SigmoidPairs.apply(a, b if spec.ring else gather_with_grad(b, group), logit_scale, logit_bias,
                               hard_negatives, spec)
    return global_sum(local, group) / (a.shape[0] * spec.world)


class SiglipConfig(LossSection):
    kind: Literal["siglip"] = "siglip"
    mined_negatives: Optional[MinedNegativesConfig] = None


@LOSSES.register("siglip", config=SiglipConfig)
class SiglipLoss(PairwiseLoss):
    requires = frozenset({"logit_bias"})

    def pair_loss(self, a, b, negatives, features):
        logit_bias = features.get("logit_bias")
        if logit_bias is None:
            raise UserError("loss.kind 'siglip' needs a logit bias: set model.init_logit_bias (SigLIP uses -10)")
        return siglip_loss(a, b, features["logit_scale"], logit_bias, hard_negatives=negatives,
                           **self.options)
