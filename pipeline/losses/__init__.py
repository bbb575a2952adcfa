"""Losses: chunked cross-modal contrastive losses whose B×B similarity matrix never exists.

InfoNCE (`clip_loss`), sigmoid (`siglip_loss`) and Symile (`symile_loss`, 3+ modalities), with
hard negatives, exact gradients (custom autograd Functions that recompute tiles in backward) and
distributed over a process group with O(B·D) communication (all-gathered columns, or a ring of
column blocks that keeps each rank at O(B_local·D)). Knows nothing about models or training.
"""
from pipeline.losses.clip import clip_loss
from pipeline.losses.module import ContrastiveLoss
from pipeline.losses.siglip import siglip_loss
from pipeline.losses.symile import symile_loss

__all__ = ["clip_loss", "siglip_loss", "symile_loss", "ContrastiveLoss"]
