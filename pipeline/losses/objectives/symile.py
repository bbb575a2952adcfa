"""Symile: contrastive learning over 3+ modalities with the multilinear inner product."""
from __future__ import annotations

from dataclasses import replace
from typing import Literal, Sequence

import torch

from pipeline.batch import Features, modalities_of
from pipeline.losses.base import ContrastiveLoss
from pipeline.losses.comm import gather_with_grad, global_sum, permuted_rows
from pipeline.losses.config import LossSection
from pipeline.losses.tiles import LogDenominators, TileSpec, TupleLogDenominators, accumulator_dtype
from pipeline.registry import LOSSES


def symile_loss(features: Sequence[torch.Tensor], logit_scale: torch.Tensor, *, negatives: str = "n",
                chunk_size: int | None = None, generator: torch.Generator | None = None,
                compute_dtype: str = "auto", distributed: str = "auto", group=None) -> torch.Tensor:
    """Mean over anchors of CE(s·MIP(anchor_i, candidates), positive = row i's own tuple).

    negatives="n": candidates are the row-wise product of the other modalities, each with a
    random row permutation from `generator` (global RNG if None), the true MIP on the diagonal.
    negatives="n_squared": every tuple of other-modality rows is a candidate (B^(M-1) columns,
    tiled, equal to `symile.Symile("n_squared")`). `compute_dtype` and `distributed` as in
    `clip_loss`; "n_squared" always gathers (every tuple of every rank's rows is a candidate).

    With `group`, each rank passes its local rows; every rank returns the GLOBAL loss value, and
    gradients flow only into this rank's share (summed over ranks: the single-process gradient).
    """
    if len(features) < 2:
        raise ValueError(f"symile_loss needs at least 2 modalities, got {len(features)}")
    if negatives not in ("n", "n_squared"):
        raise ValueError(f"negatives must be 'n' or 'n_squared', got {negatives!r}")
    spec = TileSpec.resolve(features[0].device, chunk_size, compute_dtype, distributed, group)
    if negatives == "n_squared":  # every tuple of every rank's rows is a candidate: the columns are gathered
        spec = replace(spec, ring=False)
    stat = accumulator_dtype(features[0])
    features = [f.to(spec.gemm_dtype(f)) for f in features]  # tuple products in the GEMM dtype too
    ring = spec.ring
    n_global = features[0].shape[0] * spec.world
    gathered = [] if ring else [gather_with_grad(f, group) for f in features]  # the ring uses local rows only
    total = None
    for m, anchor in enumerate(features):
        others_local = [f for k, f in enumerate(features) if k != m]
        true_tuple = anchor
        for o in others_local:
            true_tuple = true_tuple * o
        positives = logit_scale * true_tuple.sum(-1, dtype=stat)
        if negatives == "n":
            # candidate j = Π_o o[perm_o[j]]; with the ring, this rank builds its own n candidates
            # from rows fetched by one all-to-all, and the candidate blocks then travel the ring
            sources = others_local if ring else [g for k, g in enumerate(gathered) if k != m]
            candidates = torch.ones_like(sources[0])
            for o in sources:
                perm = torch.randperm(n_global, generator=generator).to(o.device)
                candidates = candidates * (permuted_rows(o, perm, group) if ring else o[perm])
            dens = LogDenominators.apply(anchor, candidates, logit_scale, positives, None, 1.0, 0.0, False, spec)
        else:
            others = [g for k, g in enumerate(gathered) if k != m]
            dens = TupleLogDenominators.apply(anchor, logit_scale, positives, spec, *others)
        loss = dens - positives.to(dens.dtype).sum()
        total = loss if total is None else total + loss
    assert total is not None  # at least 2 modalities
    return global_sum(total, group) / (n_global * len(features))


class SymileConfig(LossSection):
    kind: Literal["symile"] = "symile"
    negatives: Literal["n", "n_squared"] = "n"


@LOSSES.register("symile", config=SymileConfig)
class SymileLoss(ContrastiveLoss):
    """All modalities jointly. The row permutations of `negatives: n` come from a generator seeded by
    (seed, step): the same on every rank and after a resume."""

    cfg: SymileConfig

    def forward(self, features: Features, step: int = 0, index: torch.Tensor | None = None) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return symile_loss([features[m] for m in modalities_of(features)], features["logit_scale"],
                           negatives=self.cfg.negatives, generator=generator, **self.options)
