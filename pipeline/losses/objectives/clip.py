"""Symmetric InfoNCE (CLIP), optionally with hard negatives and DiHT's HN-NCE weighting."""
from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field

from pipeline.losses.base import PairwiseLoss
from pipeline.losses.comm import gather_with_grad, global_sum
from pipeline.losses.config import LossSection
from pipeline.losses.objectives.mined_negatives import MinedNegativesConfig
from pipeline.losses.tiles import LogDenominators, TileSpec
from pipeline.registry import LOSSES


def clip_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor, *, chunk_size: int | None = None,
              hard_negatives: torch.Tensor | None = None, hard_negative_alpha: float = 1.0,
              hard_negative_beta: float = 0.0, compute_dtype: str = "auto", distributed: str = "auto",
              group=None) -> torch.Tensor:
    """½[CE(s·A·Bᵀ) + CE(s·B·Aᵀ)] over the global batch, never materialising the B×B logits.

    With the defaults this equals `open_clip.loss.ClipLoss()(a, b, logit_scale)`. `hard_negatives`
    [B, K, D] are extra candidates for the a→b direction of each row (NegCLIP). α/β weight the
    negatives as in DiHT's HN-NCE (α=1, β=0: InfoNCE; α=0, β=0: DCL). `compute_dtype`: "auto"
    runs the tile GEMMs in the features' dtype (bf16/fp16), "fp32" casts them to fp32; statistics
    are fp32 either way (see pipeline.losses.tiles.spec).

    With `group`, each rank passes its local rows; every rank returns the GLOBAL loss value, and
    gradients flow only into this rank's share, so summed over ranks they equal the
    single-process gradient (the trainer multiplies by the world size because DeepSpeed averages).
    `distributed`: "gather" all-gathers the columns (each rank holds all B·D of them and their
    gradient); "ring" passes column blocks around the ranks, so a rank holds O(B_local·D);
    "auto" rings from 3 ranks on.
    """
    spec = TileSpec.resolve(a.device, chunk_size, compute_dtype, distributed, group)
    columns = b if spec.ring else gather_with_grad(b, group)
    cross_entropies = LogDenominators.apply(a, columns, logit_scale, None, hard_negatives,
                                            float(hard_negative_alpha), float(hard_negative_beta), True, spec)
    return global_sum(0.5 * cross_entropies, group) / (a.shape[0] * spec.world)


class ClipConfig(LossSection):
    kind: Literal["clip"] = "clip"
    hard_negative_alpha: float = Field(1.0, ge=0, description="HN-NCE α: weight of the positive (1 = InfoNCE)")
    hard_negative_beta: float = Field(0.0, ge=0, description="HN-NCE β: hardness weighting (0 = InfoNCE)")
    mined_negatives: Optional[MinedNegativesConfig] = None


@LOSSES.register("clip", config=ClipConfig)
class ClipLoss(PairwiseLoss):
    cfg: ClipConfig
    def pair_loss(self, a, b, negatives, features):
        return clip_loss(a, b, features["logit_scale"], hard_negatives=negatives,
                         hard_negative_alpha=self.cfg.hard_negative_alpha,
                         hard_negative_beta=self.cfg.hard_negative_beta, **self.options)
