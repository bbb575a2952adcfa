"""InfoNCE's tile engine: row (and column) log-denominators of the B×B logits, one tile at a time.

Like every engine in pipeline.losses.tiles, a custom autograd Function that sweeps tiles once in
forward (keeping only per-row / per-column statistics) and recomputes every tile in backward to form
the gradient with two GEMMs per tile. The elementwise work on each tile after its GEMM lives in
`kernels`, compiled into one fused loop for full tiles. Precision and tile size: `spec`.
"""
from __future__ import annotations

import math

import torch

from pipeline.losses.comm import Ring, gather_rows
from pipeline.losses.tiles.kernels import exp_sums, softmax_sum
from pipeline.losses.tiles.ops import (
    NEG_INF,
    add_product,
    backward_inputs,
    diagonal_mask,
    full_tile,
    in_dtype,
    mm,
    negative_logits,
    positive_scale,
    row_dots,
    spans,
)
from pipeline.losses.tiles.spec import TileSpec, accumulator_dtype


def tile_logsumexps(dots: torch.Tensor, scale: torch.Tensor, cols: bool, full: bool):
    """Row and (if `cols`) column log-sum-exps of z = scale·dots (scale > 0) in scale's dtype, from
    `kernels.exp_sums` (fused when `full`): rows shifted by their maxima, columns by the tile's. A
    column whose sum comes near underflow (its maximum ~60 below the tile's in fp32) is redone
    directly, so the result stays exact to the dtype's precision.
    """
    rows, top, col_sums = exp_sums(dots, scale, cols, full=full)
    if not cols:
        return rows, None
    columns = top + col_sums.log()
    low = col_sums < torch.finfo(scale.dtype).tiny ** 0.7
    if low.any():
        columns[low] = torch.logsumexp(scale * dots[:, low].to(scale.dtype), 0)
    return rows, columns


def softmax_weights(z, l1, l2, beta):
    """d/dz of LSE((1+β)z) − LSE(βz) given both LSEs: (1+β)·softmax((1+β)z) − β·softmax(βz)."""
    if not beta:
        return torch.exp(z - l1)
    return (1 + beta) * torch.exp((1 + beta) * z - l1) - beta * torch.exp(beta * z - l2)


def sweep_statistics(a_mm, block, row_offset, col_offset, scale_value, beta, cols, chunk, r1, r2, c1, c2):
    """One column block's tiles: fold their row LSEs into r1/r2 and their column LSEs into c1/c2."""
    acc_dtype, dev = r1.dtype, a_mm.device
    factors = [torch.tensor(f * scale_value, dtype=acc_dtype, device=dev) for f in ((1 + beta, beta) if beta else (1.0,))]
    for i0, i1 in spans(a_mm.shape[0], chunk):
        for j0, j1 in spans(block.shape[0], chunk):
            dots = mm(a_mm[i0:i1], block[j0:j1].T)
            m = diagonal_mask(i0 + row_offset, i1 + row_offset, j0 + col_offset, j1 + col_offset, dev)
            if m is not None:
                dots = dots.masked_fill(m, NEG_INF)
            for scale, rs, cs in zip(factors, (r1, r2), (c1, c2)):
                row_lse, col_lse = tile_logsumexps(dots, scale, cols, full_tile(i0, i1, j0, j1, chunk))
                rs[i0:i1] = torch.logaddexp(rs[i0:i1], row_lse)
                if col_lse is not None:  # made when `cols`
                    cs[j0:j1] = torch.logaddexp(cs[j0:j1], col_lse)


def sweep_gradients(a_mm, block, col_stats, row_stats, row_offset, col_offset, s, beta, cols, chunk, ga, gb):
    """One column block's tiles in backward: add Σ_j G_ij b_j into `ga` and Σ_i G_ij a_i into `gb`.

    row_stats = (r1, r2, w_row, d_row) of the local rows, col_stats the same four for the block.
    """
    for i0, i1 in spans(a_mm.shape[0], chunk):
        rows = a_mm[i0:i1]
        for j0, j1 in spans(block.shape[0], chunk):
            G = gradient_tile(rows, block[j0:j1], (i0, i1), (j0, j1), row_stats, col_stats if cols else None, s,
                              beta, ga.dtype, chunk)
            m = diagonal_mask(i0 + row_offset, i1 + row_offset, j0 + col_offset, j1 + col_offset, a_mm.device)
            if m is not None:
                G.masked_fill_(m, 0.0)
            add_product(ga[i0:i1], G, block[j0:j1])
            add_product(gb[j0:j1], G.T, rows)
            del G  # before the next tile's product exists: one tile's buffers at a time


def gradient_tile(a, b, rows, cols, row_stats, col_stats, s, beta, acc_dtype, chunk):
    """G = ∂loss/∂z for the tile a·bᵀ, in the GEMM dtype (a's); its fp32 buffers die with this call."""
    (i0, i1), (j0, j1) = rows, cols
    r1, r2, w_row, d_row = row_stats
    mm_dtype, dots = a.dtype, mm(a, b.T)
    if beta:
        zf = s * dots.to(acc_dtype)
        G = w_row[i0:i1, None] * softmax_weights(zf, r1[i0:i1, None], r2[i0:i1, None], beta)
        if col_stats is not None:
            c1, c2, w_col, _ = col_stats
            G += w_col[None, j0:j1] * softmax_weights(zf, c1[None, j0:j1], c2[None, j0:j1], beta)
        return G.to(mm_dtype)
    # v = LSE when β = 0, so w·exp(z − LSE) = exp(z − d): one exp per direction
    d_col = col_stats[3][j0:j1] if col_stats is not None else None
    return softmax_sum(dots, s, d_row[i0:i1], d_col, mm_dtype, full=full_tile(i0, i1, j0, j1, chunk))


def _own_rows(x: torch.Tensor, offset: int, n: int, ring: bool) -> torch.Tensor:
    """This rank's rows of a column-side tensor: all of it with the ring, rows offset..offset+n if gathered."""
    return x if ring else x[offset:offset + n]


class LogDenominators(torch.autograd.Function):
    """Σ over this rank's rows of the row log-denominators (+ Σ over its columns of the column ones).

    Inputs: local rows `a` [n, D]; columns `b`: all N of them (every rank's, gathered by the
    caller), or with `ring` only this rank's n, the others passing by around the ring; the
    positive logits `zd` [n] (plain autograd outside, so any positive can be used, e.g.
    Symile's true MIP), or None for the pair's own s·⟨a_i, b_i⟩: then the result is the sum of
    cross-entropies Σ(d − z_ii) and the positives' gradient goes into the accumulators in place
    (no [n, D] gradient temporaries of an outside product at the memory peak); per-row hard
    negatives [n, K, D]. Row i's positive is column rank·n + i. With HN-NCE (α, β) the log-denominator is
    log(α·e^{z_ii} + N_neg · Σ_{j≠i} e^{(1+β)z_ij} / Σ_{j≠i} e^{βz_ij}); α=1, β=0 is InfoNCE.
    Tiles of chunk×chunk logits are made, reduced by online log-sum-exp and dropped; backward
    makes them again. Only O(n) row and O(N) (ring: O(n)) column statistics are kept; with the
    ring, column statistics and column gradients travel with their block back to its owner.
    The logit scale rides in the fp32 pass that shifts the exponent, and ∂/∂s comes from the
    gradient accumulators (Σ_ij G_ij⟨a_i, b_j⟩ = Σ_i ⟨a_i, Σ_j G_ij b_j⟩), so no tile pass is
    spent on either.
    """

    @staticmethod
    def forward(ctx, a, b, scale, zd, negs, alpha, beta, cols, spec: TileSpec):
        rank, world, chunk, group, ring = spec.rank, spec.world, spec.chunk, spec.group, spec.ring
        n = a.shape[0]
        N = n * world if ring else b.shape[0]
        offset = rank * n
        acc_dtype, mm_dtype = accumulator_dtype(a), spec.gemm_dtype(a)
        a_mm = a.detach().to(mm_dtype)
        s = scale.detach().to(acc_dtype)
        scale_value = positive_scale(s)
        r1, r2 = (torch.full((n,), NEG_INF, device=a_mm.device, dtype=acc_dtype) for _ in range(2))
        blocks = Ring([b.detach().to(mm_dtype)], group, enabled=ring, part_rows=chunk)
        for col_offset, (block,) in blocks:
            fresh = lambda rows=block.shape[0]: [torch.full((rows,), NEG_INF, device=a_mm.device, dtype=acc_dtype)  # noqa: E731
                                                 for _ in range(2)]
            c1, c2 = blocks.take(fresh) if cols else (None, None)
            sweep_statistics(a_mm, block, offset, col_offset, scale_value, beta, cols, chunk, r1, r2, c1, c2)
            if cols:
                assert c1 is not None and c2 is not None
                blocks.give([c1, c2])
        if negs is not None:
            zn = negative_logits(a_mm, negs.detach().to(mm_dtype), s)
            r1 = torch.logaddexp(r1, torch.logsumexp((1 + beta) * zn, 1))
            if beta:
                r2 = torch.logaddexp(r2, torch.logsumexp(beta * zn, 1))
        k = 0 if negs is None else negs.shape[1]
        diagonal = zd is None
        zdf = s * row_dots(a_mm, _own_rows(b, offset, n, ring), acc_dtype, chunk) if diagonal else zd.detach().to(acc_dtype)
        log_alpha = math.log(alpha) if alpha > 0 else NEG_INF
        v_row = r1 if not beta else math.log(N - 1 + k) + r1 - r2
        d_row = torch.logaddexp(log_alpha + zdf, v_row)
        total = d_row.sum()
        c1 = c2 = v_col = d_col = None
        if cols:
            c1, c2 = blocks.carried  # ring: this rank's columns; gather: all N, summed over ranks below
            if group is not None and not ring:
                c1, c2 = (torch.logsumexp(gather_rows(c[None], group), 0) for c in (c1, c2))
            v_col = c1 if not beta else math.log(N - 1) + c1 - c2
            d_col = torch.logaddexp(log_alpha + zdf, v_col if ring else v_col[offset:offset + n])
            total = total + d_col.sum()
            if not ring:
                d_col = gather_rows(d_col, group)
        if diagonal:
            total = total - (2 if cols else 1) * zdf.sum()
        ctx.save_for_backward(a, b, scale, zdf, negs, r1, r2, v_row, d_row, c1, c2, v_col, d_col)
        ctx.spec, ctx.alpha, ctx.beta, ctx.cols = spec, alpha, beta, cols
        ctx.zd_dtype = None if diagonal else zd.dtype  # None: the positives are the pair's own, made here
        return total

    @staticmethod
    def backward(ctx, g):
        a, b, scale, zdf, negs, r1, r2, v_row, d_row, c1, c2, v_col, d_col = ctx.saved_tensors
        spec, alpha, beta, cols, zd_dtype = ctx.spec, ctx.alpha, ctx.beta, ctx.cols, ctx.zd_dtype
        chunk, group, ring, diagonal = spec.chunk, spec.group, spec.ring, zd_dtype is None
        n, D, offset, acc_dtype, mm_dtype, g, a_mm = backward_inputs(a, g, spec)
        s = scale.detach().to(acc_dtype)
        positive_scale(s)
        ga = torch.zeros(n, D, device=a_mm.device, dtype=acc_dtype)  # Σ_j G_ij b_j over every column block
        row_stats = (r1, r2, torch.exp(v_row - d_row), d_row)  # w_row: weight of the off-diagonal part
        col_stats = [c1, c2, torch.exp(v_col - d_col), d_col] if cols else []
        blocks = Ring([b.detach().to(mm_dtype), *col_stats], group, enabled=ring, part_rows=chunk)
        for col_offset, (block, *stats) in blocks:
            gb, = blocks.take(lambda rows=block.shape[0]: [torch.zeros(rows, D, device=a_mm.device, dtype=acc_dtype)])
            sweep_gradients(a_mm, block, stats, row_stats, offset, col_offset, s, beta, cols, chunk, ga, gb)
            blocks.give([gb])
        gb, = blocks.carried
        gneg = torch.empty_like(negs) if ctx.needs_input_grad[4] else None  # mined negatives come detached
        if negs is not None:
            for i0, i1 in spans(n, chunk):
                nf, rows = negs[i0:i1].detach().to(mm_dtype), a_mm[i0:i1]
                zn = negative_logits(rows, nf, s)
                Gn = row_stats[2][i0:i1, None] * softmax_weights(zn, r1[i0:i1, None], r2[i0:i1, None], beta)
                ga[i0:i1] += torch.einsum("nk,nkd->nd", Gn.to(mm_dtype), nf).to(acc_dtype)
                if gneg is not None:
                    gneg[i0:i1] = (g * s * Gn)[:, :, None] * rows[:, None, :]
        log_alpha = math.log(alpha) if alpha > 0 else NEG_INF
        w_pos = torch.exp(log_alpha + zdf - d_row)  # ∂(Σ d)/∂z_ii
        if cols:
            w_pos = w_pos + torch.exp(log_alpha + zdf - (d_col if ring else d_col[offset:offset + n]))
        gzd = None if diagonal else (g * w_pos).to(zd_dtype)
        if diagonal:  # ∂/∂z_ii of Σ d − m·Σ z_ii, along b_i onto a_i (then also in ∂/∂s) and along a_i onto b_i
            coef = w_pos - (2 if cols else 1)
            own_b, own_gb = _own_rows(b.detach(), offset, n, ring), _own_rows(gb, offset, n, ring)
            for i0, i1 in spans(n, chunk):
                ga[i0:i1] += coef[i0:i1, None] * own_b[i0:i1]
                own_gb[i0:i1] += coef[i0:i1, None] * a_mm[i0:i1]
        gs = row_dots(ga, a_mm, acc_dtype, chunk).sum() * g
        ga = in_dtype(ga, g * s, a.dtype, chunk)
        gb = in_dtype(gb, g * s, b.dtype, chunk)
        return ga, gb, gs.reshape(scale.shape).to(scale.dtype), gzd, gneg, None, None, None, None
