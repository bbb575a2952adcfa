"""Sigmoid pairwise loss (SigLIP), tiled: every pair is an independent binary decision."""
from __future__ import annotations

import torch

from pipeline.losses.distributed import gather_with_grad, global_sum, rank_and_world, use_ring
from pipeline.losses.tiled import SigmoidPairs, default_chunk


def siglip_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor, *,
                chunk_size: int | None = None, hard_negatives: torch.Tensor | None = None,
                compute_dtype: str = "auto", distributed: str = "auto", group=None) -> torch.Tensor:
    """−(1/B) Σ_ij log σ(z_ij·(s·a_i·b_j + bias)); equals `open_clip.loss.SigLipLoss()(a, b, s, bias)`.

    `hard_negatives` [B, K, D] add K negative pairs per row. `compute_dtype` and `distributed` as
    in `clip_loss`.
    With `group`, each rank passes its local rows; every rank returns the GLOBAL loss value, and
    gradients flow only into this rank's share (summed over ranks: the single-process gradient).
    """
    ring = use_ring(distributed, group)
    local = SigmoidPairs.apply(a, b if ring else gather_with_grad(b, group), logit_scale, logit_bias, hard_negatives,
                               chunk_size or default_chunk(a.device), group, compute_dtype, ring)
    return global_sum(local, group) / (a.shape[0] * rank_and_world(group)[1])
