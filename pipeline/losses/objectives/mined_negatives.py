"""Mined and mixed hard negatives (MoCHi) for data without explicit negative captions.

A no-grad tiled sweep over the global batch keeps each anchor's top-k most similar
non-positive candidates (a running top-k per row chunk: never a B×B matrix; one extra B×B×D
GEMM, a quarter of the loss's four). From those, s synthetic negatives per anchor are convex
mixtures of two of them, and s2 more mix the anchor itself with one of them (MoCHi's harder
ones, anchor weight < ½), normalised and detached. They are then passed as
`hard_negatives=[n, s+s2, D]` to `clip_loss` / `siglip_loss`, exactly like explicit ones.

Distributed, the columns are all-gathered, or with the ring (`distributed: ring`, as in the loss)
they pass by in blocks during the top-k sweep and only the chosen rows are fetched from their
owners afterwards (`fetch_rows`): no rank holds the global batch's features.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import Field

from pipeline.losses.comm import fetch_rows, gather_rows
from pipeline.losses.tiles import TileSpec, accumulator_dtype, top_k_negatives
from pipeline.section import Section


@dataclass
class MixingDraws:
    """MoCHi's random choices for the whole global batch, so every rank and a resumed run agree."""
    pairs: torch.Tensor  # [N, s, 2] positions in the top-k list
    alpha: torch.Tensor  # [N, s] weight of the first of the pair, U(0, 1)
    partner: torch.Tensor  # [N, s2] position in the top-k list mixed with the anchor
    beta: torch.Tensor  # [N, s2] weight of the anchor, U(0, ½)

    @classmethod
    def draw(cls, generator: torch.Generator, batch: int, k: int, mixed: int, with_anchor: int) -> "MixingDraws":
        g = generator
        return cls(torch.randint(k, (batch, mixed, 2), generator=g), torch.rand(batch, mixed, generator=g),
                   torch.randint(k, (batch, with_anchor), generator=g),
                   0.5 * torch.rand(batch, with_anchor, generator=g))

    def rows(self, start: int, stop: int) -> "MixingDraws":
        return MixingDraws(self.pairs[start:stop], self.alpha[start:stop], self.partner[start:stop],
                           self.beta[start:stop])


@torch.no_grad()
def mix_negatives(anchors: torch.Tensor, rows_of, top: torch.Tensor, draws: MixingDraws) -> torch.Tensor:
    """[n, s+s2, D] unit vectors α·h_p + (1−α)·h_q and β·anchor + (1−β)·h_r, h = the columns in `top`
    (`rows_of(global indices)` gives them).

    Only the chosen rows are fetched (never the [n, k, D] block of all top-k candidates) and
    mixed in place in the output, so the peak is the output plus one fetched block.
    """
    acc = accumulator_dtype(anchors)
    s = draws.alpha.shape[1]
    out = torch.empty((top.shape[0], s + draws.beta.shape[1], anchors.shape[1]), dtype=acc, device=anchors.device)

    def pick(positions):
        return rows_of(torch.gather(top, 1, positions.to(top.device))).to(acc)

    alpha, beta = (w.to(anchors.device, acc)[..., None] for w in (draws.alpha, draws.beta))
    out[:, :s] = pick(draws.pairs[..., 1])
    out[:, :s].lerp_(pick(draws.pairs[..., 0]), alpha)  # α·h_p + (1−α)·h_q
    out[:, s:] = pick(draws.partner)
    out[:, s:].lerp_(anchors[:, None, :].to(acc).expand_as(out[:, s:]), beta)
    return out.div_(out.norm(dim=-1, keepdim=True).clamp_min_(1e-12))


class MinedNegatives:
    """Options {top_k, mixed, mix_with_anchor, start_step} → each step's synthetic negatives for a→b.

    Call with the local anchors `a`, local candidates `b`, the step and a generator the caller
    reseeds per step (identical on every rank); returns [n, mixed+mix_with_anchor, D] for
    `hard_negatives=`, or None before `start_step` (MoCHi starts once the embedding is useful).
    """

    def __init__(self, top_k: int = 16, mixed: int = 8, mix_with_anchor: int = 0, start_step: int = 0,
                 chunk_size: int | None = None, group=None, distributed: str = "auto"):
        if top_k < 1 or mixed < 0 or mix_with_anchor < 0 or mixed + mix_with_anchor == 0:
            raise ValueError("mined negatives need top_k >= 1 and mixed + mix_with_anchor >= 1")
        self.top_k, self.mixed, self.with_anchor, self.start_step = top_k, mixed, mix_with_anchor, start_step
        self.chunk_size, self.group, self.distributed = chunk_size, group, distributed

    def __call__(self, a: torch.Tensor, b: torch.Tensor, step: int, generator: torch.Generator) -> torch.Tensor | None:
        if step < self.start_step:
            return None
        spec = TileSpec.resolve(a.device, self.chunk_size, distributed=self.distributed, group=self.group)
        rank, n, b = spec.rank, a.shape[0], b.detach()
        columns = b if spec.ring else gather_rows(b, self.group)
        _, top = top_k_negatives(a.detach(), columns, self.top_k, spec)
        rows_of = (lambda idx: fetch_rows(b, idx, self.group)) if spec.ring else columns.__getitem__
        draws = MixingDraws.draw(generator, n * spec.world, self.top_k, self.mixed, self.with_anchor)
        return mix_negatives(a.detach(), rows_of, top, draws.rows(rank * n, rank * n + n)).to(b.dtype)


class MinedNegativesConfig(Section):
    """`loss.mined_negatives` for clip and siglip: each step's top-k non-positive columns of the global batch,
    mixed into synthetic hard negatives (MoCHi) and used as extra candidates."""

    top_k: int = Field(16, ge=1)
    mixed: int = Field(8, ge=0, description="mixtures of two of the top-k per anchor")
    mix_with_anchor: int = Field(0, ge=0, description="mixtures of one of the top-k with the anchor (harder)")
    start_step: int = Field(0, ge=0, description="mine from this step on (once the embedding is useful)")
