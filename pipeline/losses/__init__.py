"""Losses: chunked cross-modal contrastive losses whose B×B similarity matrix never exists.

Three layers, one folder each, each depending only on the ones below it:
- `objectives/`: what a researcher edits. InfoNCE (`clip`, with hard negatives and HN-NCE), sigmoid
  (`siglip`), Symile (`symile`, 3+ modalities), the global contrastive loss (`global_clip`) and mined
  negatives; each a functional loss plus its registered module and config section.
- `tiles/`: the engines that make the logits one tile at a time with exact gradients (custom autograd
  Functions that recompute tiles in backward), the fused tile kernels, and one `TileSpec` that says how.
- `comm.py` (collectives: gather with gradient, the ring of column blocks, row fetches) and
  `sample_table.py` (per-sample state sharded over ranks).
`base.py` is the contract every loss keeps; `config.py` the keys every loss section has. Knows nothing
about models or training.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.lazy import lazy_exports
from pipeline.registry import LOSSES

if TYPE_CHECKING:  # for readers and type checkers; at run time the names load on first use
    from pipeline.losses.base import ContrastiveLoss
    from pipeline.losses.objectives.clip import clip_loss
    from pipeline.losses.objectives.siglip import siglip_loss
    from pipeline.losses.objectives.symile import symile_loss

__getattr__ = lazy_exports(__name__, {"ContrastiveLoss": "pipeline.losses.base",
                                      "clip_loss": "pipeline.losses.objectives.clip",
                                      "siglip_loss": "pipeline.losses.objectives.siglip",
                                      "symile_loss": "pipeline.losses.objectives.symile"})


def build_loss(cfg, group=None, seed: int = 0, num_samples: int | None = None) -> ContrastiveLoss:
    """The registered loss for a `loss:` section (a LossSection subclass, e.g. from `loss_config`); a loss
    that requires "sample_index" also gets the dataset's sample count."""
    cls = LOSSES.get(cfg.kind, "loss.kind").obj
    extra = {"num_samples": num_samples} if "sample_index" in cls.requires else {}
    return cls(cfg, group=group, seed=seed, **extra)


def loss_config(kind: str, **options):
    """A loss section from Python, validated like the YAML one: `loss_config("clip", chunk_size=64)`."""
    return LOSSES.section(kind, "loss.kind")(kind=kind, **options)


__all__ = ["clip_loss", "siglip_loss", "symile_loss", "ContrastiveLoss", "build_loss", "loss_config"]
