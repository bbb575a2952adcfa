"""Sigmoid pairwise loss (SigLIP), tiled: every pair is an independent binary decision."""
from __future__ import annotations

from typing import Literal, Optional

import torch

from pipeline.config import LossSection
from pipeline.errors import UserError
from pipeline.losses.base import PairwiseLoss
from pipeline.losses.distributed import gather_with_grad, global_sum
from pipeline.losses.mined import MinedNegativesConfig
from pipeline.losses.tiled import DEFAULT_CHUNK, SigmoidPairs
from pipeline.registry import LOSSES


def siglip_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor, *,
                chunk_size: int | None = None, hard_negatives: torch.Tensor | None = None,
                group=None) -> torch.Tensor:
    """−(1/B) Σ_ij log σ(z_ij·(s·a_i·b_j + bias)); equals `open_clip.loss.SigLipLoss()(a, b, s, bias)`.

    `hard_negatives` [B, K, D] add K negative pairs per row. With `group`, rows are local,
    columns global, and each rank gets the global loss and its share of the gradient.
    """
    b_all = gather_with_grad(b, group)
    local = SigmoidPairs.apply(a, b_all, logit_scale, logit_bias, hard_negatives, chunk_size or DEFAULT_CHUNK, group)
    return (global_sum(local, group) / b_all.shape[0]).to(a.dtype)


class SiglipConfig(LossSection):
    kind: Literal["siglip"] = "siglip"
    mined_negatives: Optional[MinedNegativesConfig] = None


@LOSSES.register("siglip", config=SiglipConfig, needs_logit_bias=True)
class SiglipLoss(PairwiseLoss):
    def pair_loss(self, a, b, negatives, features):
        if features.get("logit_bias") is None:
            raise UserError("loss.kind 'siglip' needs a logit bias: set model.init_logit_bias (SigLIP uses -10)")
        return siglip_loss(a, b, features["logit_scale"], features["logit_bias"], chunk_size=self.cfg.chunk_size,
                           hard_negatives=negatives, group=self.group)
