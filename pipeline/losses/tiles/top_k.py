"""Hard-negative mining's tile engine: each row's top-k most similar columns, never a B×B matrix (no grad)."""
from __future__ import annotations

import torch

from pipeline.losses.comm import Ring
from pipeline.losses.tiles.ops import NEG_INF, diagonal_mask, spans
from pipeline.losses.tiles.spec import TileSpec, accumulator_dtype


@torch.no_grad()
def top_k_negatives(a: torch.Tensor, b: torch.Tensor, k: int, spec: TileSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities, global column indices) [n, k] of each local row's k most similar columns but its own.

    `b`: all N columns (gathered), or with `spec.ring` this rank's, the others passing by around the ring."""
    rank, world, chunk, ring = spec.rank, spec.world, spec.chunk, spec.ring
    n = a.shape[0]
    N = n * world if ring else b.shape[0]
    if not 0 < k < N:
        raise ValueError(f"top_k must be in [1, {N - 1}] for a global batch of {N}, got {k}")
    acc = accumulator_dtype(a)
    af = a.to(acc)
    values = torch.full((n, k), NEG_INF, dtype=acc, device=af.device)
    indices = torch.zeros((n, k), dtype=torch.long, device=af.device)
    for col_offset, (block,) in Ring([b.to(acc)], spec.group, enabled=ring, part_rows=chunk):
        for i0, i1 in spans(n, chunk):
            for j0, j1 in spans(block.shape[0], chunk):
                z = af[i0:i1] @ block[j0:j1].T
                mask = diagonal_mask(i0 + rank * n, i1 + rank * n, j0 + col_offset, j1 + col_offset, af.device)
                if mask is not None:
                    z = z.masked_fill(mask, NEG_INF)
                cols = torch.arange(j0 + col_offset, j1 + col_offset, device=af.device).expand(i1 - i0, -1)
                values[i0:i1], pick = torch.topk(torch.cat([values[i0:i1], z], 1), k, dim=1)
                indices[i0:i1] = torch.gather(torch.cat([indices[i0:i1], cols], 1), 1, pick)
    return values, indices
