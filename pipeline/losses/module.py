"""ContrastiveLoss: the config's `loss:` section as an nn.Module over a dict of modality features."""
from __future__ import annotations

from itertools import combinations

import torch
from torch import nn

from pipeline.losses.clip import clip_loss
from pipeline.losses.siglip import siglip_loss
from pipeline.losses.symile import symile_loss


class ContrastiveLoss(nn.Module):
    """clip / siglip average over every pair of modalities; symile uses all of them jointly.

    Hard negatives `{"text": [B, K, D]}` are extra candidates for anchors of the other modality
    of each pair. Symile's row permutations come from a generator reseeded by the trainer at
    every step, so all ranks draw the same ones and a resumed run draws what it would have.
    """

    def __init__(self, kind: str = "clip", chunk_size: int | None = None, hard_negative_alpha: float = 1.0,
                 hard_negative_beta: float = 0.0, symile_negatives: str = "n", compute_dtype: str = "auto",
                 distributed: str = "auto", group=None, seed: int = 0):
        super().__init__()
        if kind not in ("clip", "siglip", "symile"):
            raise ValueError(f"unknown loss kind {kind!r}; allowed: clip, siglip, symile")
        self.kind, self.chunk_size = kind, chunk_size
        self.alpha, self.beta = hard_negative_alpha, hard_negative_beta
        self.symile_negatives, self.seed = symile_negatives, seed
        self.options = {"compute_dtype": compute_dtype, "distributed": distributed, "group": group}
        self.generator = torch.Generator().manual_seed(seed)

    def reseed(self, step: int) -> None:
        self.generator.manual_seed(self.seed * 1_000_003 + step)

    def forward(self, features: dict[str, torch.Tensor], logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None = None,
                hard_negatives: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        modalities = sorted(features)
        if self.kind == "symile":
            return symile_loss([features[m] for m in modalities], logit_scale, negatives=self.symile_negatives,
                               chunk_size=self.chunk_size, generator=self.generator, **self.options)
        negatives = hard_negatives or {}
        losses = []
        for x, y in combinations(modalities, 2):
            if x in negatives and y not in negatives:
                x, y = y, x  # negatives are candidates for the other modality's anchors
            a, b, negs = features[x], features[y], negatives.get(y)
            if self.kind == "clip":
                losses.append(clip_loss(a, b, logit_scale, chunk_size=self.chunk_size, hard_negatives=negs,
                                        hard_negative_alpha=self.alpha, hard_negative_beta=self.beta,
                                        **self.options))
            else:
                if logit_bias is None:
                    raise ValueError("the siglip loss needs a logit_bias (set model.init_logit_bias)")
                losses.append(siglip_loss(a, b, logit_scale, logit_bias, chunk_size=self.chunk_size,
                                          hard_negatives=negs, **self.options))
        return torch.stack(losses).mean()
