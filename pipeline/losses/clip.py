"""Symmetric InfoNCE (CLIP), optionally with hard negatives and DiHT's HN-NCE weighting."""
from __future__ import annotations

import torch

from pipeline.losses.distributed import gather_with_grad, global_sum
from pipeline.losses.tiled import DEFAULT_CHUNK, LogDenominators


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
