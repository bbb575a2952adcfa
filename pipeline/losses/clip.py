"""Symmetric InfoNCE (CLIP), optionally with hard negatives and DiHT's HN-NCE weighting."""
from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field

from pipeline.config import LossSection
from pipeline.losses.base import PairwiseLoss
from pipeline.losses.distributed import gather_with_grad, global_sum
from pipeline.losses.mined import MinedNegativesConfig
from pipeline.losses.tiled import DEFAULT_CHUNK, LogDenominators
from pipeline.registry import LOSSES


def clip_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor, *, chunk_size: int | None = None,
              hard_negatives: torch.Tensor | None = None, hard_negative_alpha: float = 1.0,
              hard_negative_beta: float = 0.0, group=None) -> torch.Tensor:
    """½[CE(s·A·Bᵀ) + CE(s·B·Aᵀ)] over the global batch, never materialising the B×B logits.

    With the defaults this equals `open_clip.loss.ClipLoss()(a, b, logit_scale)`. `hard_negatives`
    [B, K, D] are extra candidates for the a→b direction of each row (NegCLIP). α/β weight the
    negatives as in DiHT's HN-NCE (α=1, β=0: InfoNCE; α=0, β=0: DCL). With `group`, each rank
    passes its rows; every rank gets the global loss and its share of the global gradient.
    """
    b_all = gather_with_grad(b, group)
    positives = logit_scale * (a * b).sum(-1)
    denominators = LogDenominators.apply(a, b_all, logit_scale, positives, hard_negatives,
                                         float(hard_negative_alpha), float(hard_negative_beta), True,
                                         chunk_size or DEFAULT_CHUNK, group)
    local = 0.5 * denominators - positives.to(denominators.dtype).sum()
    return (global_sum(local, group) / b_all.shape[0]).to(a.dtype)


class ClipConfig(LossSection):
    kind: Literal["clip"] = "clip"
    hard_negative_alpha: float = Field(1.0, ge=0, description="HN-NCE α: weight of the positive (1 = InfoNCE)")
    hard_negative_beta: float = Field(0.0, ge=0, description="HN-NCE β: hardness weighting (0 = InfoNCE)")
    mined_negatives: Optional[MinedNegativesConfig] = None


@LOSSES.register("clip", config=ClipConfig)
class ClipLoss(PairwiseLoss):
    def pair_loss(self, a, b, negatives, features):
        return clip_loss(a, b, features["logit_scale"], chunk_size=self.cfg.chunk_size, hard_negatives=negatives,
                         hard_negative_alpha=self.cfg.hard_negative_alpha,
                         hard_negative_beta=self.cfg.hard_negative_beta, group=self.group)
