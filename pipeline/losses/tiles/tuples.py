"""Symile n_squared's tile engine: log-denominators over every candidate tuple, B × B^(M-1), never materialised."""
from __future__ import annotations

import torch

from pipeline.losses.tiles.ops import NEG_INF, spans
from pipeline.losses.tiles.spec import TileSpec, accumulator_dtype


class TupleLogDenominators(torch.autograd.Function):
    """Symile "n_squared": Σ over this rank's anchor rows of log Σ over ALL candidate tuples.

    Candidates for anchor row i are every tuple (j_1..j_{M-1}) of rows of the other modalities,
    scored by the multilinear product s·Σ_d a_id Π_m r_m[j_m]_d; the positive (the tuple of row
    i itself) enters through `zd`. The B × B^(M-1) logits are tiled over (anchor rows × tuple
    prefixes × last-modality rows); backward recomputes each tile under autograd and feeds it
    its softmax weights, so no tile outlives its step. Products and GEMMs run in the GEMM
    dtype; the leaves that collect the gradient over all tiles are in the statistics dtype.
    """

    @staticmethod
    def forward(ctx, a, scale, zd, spec: TileSpec, *others):
        chunk, offset = spec.chunk, spec.rank * a.shape[0]
        acc_dtype, mm_dtype = accumulator_dtype(a), spec.gemm_dtype(a)
        with torch.no_grad():
            lse = torch.full((a.shape[0],), NEG_INF, dtype=acc_dtype, device=a.device)
            for i0, i1, z, mask in _tuple_tiles(a, scale, others, chunk, offset, mm_dtype, acc_dtype):
                lse[i0:i1] = torch.logaddexp(lse[i0:i1], torch.logsumexp(z.masked_fill(mask, NEG_INF).flatten(1), 1))
            d_row = torch.logaddexp(zd.detach().to(acc_dtype), lse)
        ctx.save_for_backward(a, scale, zd, d_row, *others)
        ctx.chunk, ctx.offset, ctx.mm_dtype = chunk, offset, mm_dtype
        return d_row.sum()

    @staticmethod
    def backward(ctx, g):
        a, scale, zd, d_row, *others = ctx.saved_tensors
        chunk, offset, mm_dtype = ctx.chunk, ctx.offset, ctx.mm_dtype
        acc_dtype = d_row.dtype
        inputs = (a, scale, *others)
        leaves = [t.detach().to(acc_dtype).requires_grad_(True) for t in inputs]
        with torch.enable_grad():
            for i0, i1, z, mask in _tuple_tiles(leaves[0], leaves[1], leaves[2:], chunk, offset, mm_dtype, acc_dtype):
                weights = torch.exp(z.detach() - d_row[i0:i1, None, None]).masked_fill(mask, 0.0) * g
                z.backward(weights, retain_graph=True)  # shared casts/prefixes feed several tiles
        gzd = (torch.exp(zd.detach().to(acc_dtype) - d_row) * g).to(zd.dtype)
        grads = [(leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)).to(t.dtype)
                 for leaf, t in zip(leaves, inputs)]
        return (grads[0], grads[1], gzd, None, *grads[2:])


def _tuple_tiles(a, scale, others, chunk, offset, mm_dtype, acc_dtype):
    """Yield (i0, i1, logits [rows, prefixes, N] in `acc_dtype`, positive mask) over all candidate tuples."""
    *prefix_mods, last = [o.to(mm_dtype) for o in others]
    n, N, D = a.shape[0], last.shape[0], a.shape[1]
    n_prefix = N ** len(prefix_mods)
    rows = min(n, chunk)
    per_tile = max(1, (chunk * chunk) // (rows * max(N, D)))
    s = scale.to(acc_dtype)
    af = a.to(mm_dtype)
    for p0, p1 in spans(n_prefix, per_tile):
        flat = torch.arange(p0, p1, device=a.device)
        idx = torch.unravel_index(flat, (N,) * len(prefix_mods)) if prefix_mods else ()
        prefix = torch.ones(p1 - p0, D, dtype=mm_dtype, device=a.device)
        for mod, j in zip(prefix_mods, idx):
            prefix = prefix * mod[j]
        for i0, i1 in spans(n, rows):
            q = af[i0:i1, None, :] * prefix[None]
            z = s * (q.reshape(-1, D) @ last.T).to(acc_dtype).reshape(i1 - i0, p1 - p0, N)
            g = torch.arange(i0, i1, device=a.device) + offset
            same_prefix = torch.ones(i1 - i0, p1 - p0, dtype=torch.bool, device=a.device)
            for j in idx:
                same_prefix &= j[None, :] == g[:, None]
            mask = same_prefix[:, :, None] & (torch.arange(N, device=a.device)[None, None, :] == g[:, None, None])
            yield i0, i1, z, mask
