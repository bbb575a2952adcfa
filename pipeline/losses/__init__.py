"""Losses: chunked cross-modal contrastive losses whose B×B similarity matrix never exists.
InfoNCE (`clip`), sigmoid (`siglip`) and Symile (`symile`, 3+ modalities), with hard negatives, exact
gradients (custom autograd Functions that recompute tiles in backward) and distributed over a process
group with O(B·D) communication. Each loss registers itself in `pipeline.registry.LOSSES`; the contract
every loss keeps is in `pipeline.losses.base`. Knows nothing about models or training.
"""
from pipeline.losses.base import ContrastiveLoss
from pipeline.losses.clip import clip_loss
from pipeline.losses.siglip import siglip_loss
from pipeline.losses.symile import symile_loss
from pipeline.registry import LOSSES


def build_loss(cfg, group=None, seed: int = 0) -> ContrastiveLoss:
    """The registered loss for a `loss:` section (a LossSection subclass, e.g. from `loss_config`)."""
    return LOSSES.get(cfg.kind, "loss.kind").obj(cfg, group=group, seed=seed)


def loss_config(kind: str, **options):
    """A loss section from Python, validated like the YAML one: `loss_config("clip", chunk_size=64)`."""
    return LOSSES.get(kind, "loss.kind").config(kind=kind, **options)


__all__ = ["clip_loss", "siglip_loss", "symile_loss", "ContrastiveLoss", "build_loss", "loss_config"]
