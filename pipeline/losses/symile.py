"""Symile: contrastive learning over 3+ modalities with the multilinear inner product."""
from __future__ import annotations

from typing import Literal, Sequence

import torch

from pipeline.batch import Features, modalities_of
from pipeline.config import LossSection
from pipeline.losses.base import ContrastiveLoss
from pipeline.losses.distributed import gather_with_grad, global_sum
from pipeline.losses.tiled import DEFAULT_CHUNK, LogDenominators, TupleLogDenominators
from pipeline.registry import LOSSES


def symile_loss(features: Sequence[torch.Tensor], logit_scale: torch.Tensor, *, negatives: str = "n",
                chunk_size: int | None = None, generator: torch.Generator | None = None,
                group=None) -> torch.Tensor:
    """Mean over anchors of CE(s·MIP(anchor_i, candidates), positive = row i's own tuple).

    negatives="n": candidates are the row-wise product of the other modalities, each with a
    random row permutation from `generator` (global RNG if None), the true MIP on the diagonal.
    negatives="n_squared": every tuple of other-modality rows is a candidate (B^(M-1) columns,
    tiled, equal to `symile.Symile("n_squared")`).
    """
    if len(features) < 2:
        raise ValueError(f"symile_loss needs at least 2 modalities, got {len(features)}")
    if negatives not in ("n", "n_squared"):
        raise ValueError(f"negatives must be 'n' or 'n_squared', got {negatives!r}")
    chunk = chunk_size or DEFAULT_CHUNK
    gathered = [gather_with_grad(f, group) for f in features]
    n_global = gathered[0].shape[0]
    total = None
    for m, anchor in enumerate(features):
        others_local = [f for k, f in enumerate(features) if k != m]
        others = [g for k, g in enumerate(gathered) if k != m]
        true_tuple = anchor
        for o in others_local:
            true_tuple = true_tuple * o
        positives = logit_scale * true_tuple.sum(-1)
        if negatives == "n":
            candidates = torch.ones_like(others[0])
            for o in others:
                candidates = candidates * o[torch.randperm(n_global, generator=generator).to(o.device)]
            dens = LogDenominators.apply(anchor, candidates, logit_scale, positives, None, 1.0, 0.0, False, chunk, group)
        else:
            dens = TupleLogDenominators.apply(anchor, logit_scale, positives, chunk, group, *others)
        loss = dens - positives.to(dens.dtype).sum()
        total = loss if total is None else total + loss
    return (global_sum(total, group) / (n_global * len(features))).to(features[0].dtype)


class SymileConfig(LossSection):
    kind: Literal["symile"] = "symile"
    negatives: Literal["n", "n_squared"] = "n"


@LOSSES.register("symile", config=SymileConfig)
class SymileLoss(ContrastiveLoss):
    """All modalities jointly. The row permutations of `negatives: n` come from a generator seeded by
    (seed, step): the same on every rank and after a resume."""

    def forward(self, features: Features, step: int = 0, index: torch.Tensor | None = None) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return symile_loss([features[m] for m in modalities_of(features)], features["logit_scale"],
                           negatives=self.cfg.negatives, chunk_size=self.cfg.chunk_size, generator=generator,
                           group=self.group)
