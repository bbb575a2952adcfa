"""Losses: chunked cross-modal contrastive losses whose B×B similarity matrix never exists.
InfoNCE (`clip`), sigmoid (`siglip`) and Symile (`symile`, 3+ modalities), with hard negatives, exact
gradients (custom autograd Functions that recompute tiles in backward) and distributed over a process
group with O(B·D) communication (all-gathered columns, or a ring of column blocks that keeps each rank at
O(B_local·D)). Each loss registers itself in `pipeline.registry.LOSSES`; the contract every loss keeps is
in `pipeline.losses.base`. Knows nothing about models or training.
"""
from pipeline.losses import global_clip  # noqa: F401  (registers global_clip)
from pipeline.losses.base import ContrastiveLoss
from pipeline.losses.clip import clip_loss
from pipeline.losses.siglip import siglip_loss
from pipeline.losses.symile import symile_loss
from pipeline.registry import LOSSES


def build_loss(cfg, group=None, seed: int = 0, num_samples: int | None = None) -> ContrastiveLoss:
    """The registered loss for a `loss:` section (a LossSection subclass, e.g. from `loss_config`);
    losses registered with `needs_index` also get the dataset's sample count."""
    entry = LOSSES.get(cfg.kind, "loss.kind")
    extra = {"num_samples": num_samples} if entry.info.get("needs_index") else {}
    return entry.obj(cfg, group=group, seed=seed, **extra)


def loss_config(kind: str, **options):
    """A loss section from Python, validated like the YAML one: `loss_config("clip", chunk_size=64)`."""
    return LOSSES.get(kind, "loss.kind").config(kind=kind, **options)


__all__ = ["clip_loss", "siglip_loss", "symile_loss", "ContrastiveLoss", "build_loss", "loss_config"]
