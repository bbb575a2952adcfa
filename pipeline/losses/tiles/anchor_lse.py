"""global_clip's tile engine: each anchor's log-sum-exp over its negatives with per-anchor scales."""
from __future__ import annotations

import torch

from pipeline.losses.comm import Ring, gather_rows
from pipeline.losses.tiles.ops import NEG_INF, diagonal_mask, spans
from pipeline.losses.tiles.spec import TileSpec, accumulator_dtype


class AnchorLogSumExp(torch.autograd.Function):
    """Per-anchor log Σ_{j≠i} exp(scale_anchor · a_i·b_j) over the global batch, rows and columns.

    Inputs: local rows `a` [n, D] and their scales [n]; columns `b` and their scales: all N of
    them (gathered by the caller), or with `ring` this rank's n, the others passing by around the
    ring with their column statistics and gradient accumulators (as in log_denominators.LogDenominators).
    Returns this rank's row LSEs [n] and the LSEs of its own columns [n] (rank·n … rank·n+n−1).
    Backward takes per-anchor weights for both and recomputes every tile.
    """

    @staticmethod
    def forward(ctx, a, b, row_scale, col_scale, spec: TileSpec):
        chunk, group, ring = spec.chunk, spec.group, spec.ring
        n = a.shape[0]
        offset = spec.rank * n
        acc = accumulator_dtype(a)
        af, rs = a.detach().to(acc), row_scale.detach().to(acc)[:, None]
        rows = torch.full((n,), NEG_INF, dtype=acc, device=af.device)
        blocks = Ring([b.detach().to(acc), col_scale.detach().to(acc)], group, enabled=ring, part_rows=chunk)
        for col_offset, (block, cs) in blocks:
            cols, = blocks.take(lambda m=block.shape[0]: [torch.full((m,), NEG_INF, dtype=acc, device=af.device)])
            for i0, i1, j0, j1, z, mask in _tiles(af, block, chunk, offset, col_offset):
                zr, zc = rs[i0:i1] * z, cs[None, j0:j1] * z
                if mask is not None:
                    zr, zc = zr.masked_fill(mask, NEG_INF), zc.masked_fill(mask, NEG_INF)
                rows[i0:i1] = torch.logaddexp(rows[i0:i1], torch.logsumexp(zr, 1))
                cols[j0:j1] = torch.logaddexp(cols[j0:j1], torch.logsumexp(zc, 0))
            blocks.give([cols])
        cols, = blocks.carried  # ring: this rank's columns; gather: all N, combined over ranks here
        if group is not None and not ring:
            cols = torch.logsumexp(gather_rows(cols[None], group), 0)
        ctx.save_for_backward(a, b, row_scale, col_scale, rows, cols)
        ctx.spec = spec
        return rows, (cols if ring else cols[offset:offset + n]).clone()

    @staticmethod
    def backward(ctx, g_rows, g_cols):
        a, b, row_scale, col_scale, rows, cols = ctx.saved_tensors
        spec = ctx.spec
        chunk, group, ring, offset = spec.chunk, spec.group, spec.ring, spec.rank * a.shape[0]
        acc = accumulator_dtype(a)
        af, rs = a.detach().to(acc), row_scale.detach().to(acc)[:, None]
        w_rows = g_rows.to(acc)[:, None]
        w_cols = g_cols.to(acc).contiguous() if ring else gather_rows(g_cols.to(acc).contiguous(), group)
        ga, g_rs = torch.zeros_like(af), torch.zeros_like(rs)
        blocks = Ring([b.detach().to(acc), col_scale.detach().to(acc), cols, w_cols], group, enabled=ring,
                      part_rows=chunk)
        for col_offset, (block, cs, lse, w) in blocks:
            gb, g_cs = blocks.take(lambda x=block: [torch.zeros_like(x), x.new_zeros(x.shape[0])])
            for i0, i1, j0, j1, z, mask in _tiles(af, block, chunk, offset, col_offset):
                pr = w_rows[i0:i1] * torch.exp(rs[i0:i1] * z - rows[i0:i1, None])
                pc = w[None, j0:j1] * torch.exp(cs[None, j0:j1] * z - lse[None, j0:j1])
                if mask is not None:
                    pr, pc = pr.masked_fill(mask, 0.0), pc.masked_fill(mask, 0.0)
                g_rs[i0:i1] += (pr * z).sum(1, keepdim=True)
                g_cs[j0:j1] += (pc * z).sum(0)
                dz = pr * rs[i0:i1] + pc * cs[None, j0:j1]
                ga[i0:i1] += dz @ block[j0:j1]
                gb[j0:j1] += dz.T @ af[i0:i1]
            blocks.give([gb, g_cs])
        gb, g_cs = blocks.carried
        return (ga.to(a.dtype), gb.to(b.dtype), g_rs[:, 0].to(row_scale.dtype), g_cs.to(col_scale.dtype), None)


def _tiles(af, bf, chunk, offset, col_offset):
    """Yield (i0, i1, j0, j1, cosine tile, positive mask or None) over local rows × one column block."""
    for i0, i1 in spans(af.shape[0], chunk):
        for j0, j1 in spans(bf.shape[0], chunk):
            yield (i0, i1, j0, j1, af[i0:i1] @ bf[j0:j1].T,
                   diagonal_mask(i0 + offset, i1 + offset, j0 + col_offset, j1 + col_offset, af.device))
