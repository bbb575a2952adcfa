"""Tiled similarity engines: the B×B logits exist one chunk×chunk tile at a time, forward and backward.

Each engine is a custom autograd Function that sweeps tiles once in forward (keeping only
per-row / per-column statistics) and recomputes every tile in backward to form the gradient
with two GEMMs per tile. The elementwise work on each tile after its GEMM lives in
`pipeline.losses.kernels`, compiled into one fused loop for full tiles.

Precision. Tile GEMMs run in the *GEMM dtype*: the features' own dtype (bf16/fp16) with
`compute_dtype="auto"`, fp32 with `compute_dtype="fp32"` (inputs cast on entry), fp64 for fp64
inputs. Running log-sum-exps, softmax weights, scale/bias gradients, feature-gradient
accumulators and every statistic stay fp32 (fp64 for fp64 inputs); gradients come back in the
inputs' dtypes. On CUDA a low-precision GEMM writes fp32 logits (`torch.mm(..., out_dtype=
torch.float32)`); CPU has no such kernel, so there each logit is rounded to bf16 once, as under
open_clip's amp_bf16 autocast. Against a float64 evaluation of the same bf16 inputs that costs
(B = 4,096, D = 512, s = 100, `mmclip bench loss --dtype bf16`) a loss relative error of 4e-5,
feature-gradient cosine 0.99997 and a largest gradient error of 1.2% of the largest entry, the
order of open_clip's amp_bf16 (2e-5, 0.99995, 1.6%).

Tile size per device (`default_chunk`): 1024 on CPU (a 1024×1024 fp32 tile is 4 MiB, large
enough for full-speed bf16 and fp32 GEMMs and small enough to stay in the last-level cache for
the elementwise passes); 4096 on CUDA, where larger GEMMs are needed to fill the device
(a choice, not measured here: no GPU on the benchmark machine).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.losses.distributed import Ring, gather_rows, rank_and_world
from pipeline.losses.kernels import exp_sums, sigmoid_tile, softmax_sum, softplus_sum

NEG_INF = float("-inf")
LOW_PRECISION = (torch.bfloat16, torch.float16)
COMPUTE_DTYPES = ("auto", "fp32")


def default_chunk(device: torch.device) -> int:
    return 4096 if device.type == "cuda" else 1024


def stat_dtype(t: torch.Tensor) -> torch.dtype:
    """Statistics and accumulators: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def gemm_dtype(t: torch.Tensor, compute: str) -> torch.dtype:
    if compute not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {compute!r}")
    if compute == "auto" and t.dtype in LOW_PRECISION:
        return t.dtype
    return stat_dtype(t)


def mm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x @ y; a low-precision GEMM on CUDA writes fp32, on CPU (no such kernel) it keeps x's dtype."""
    if x.is_cuda and x.dtype in LOW_PRECISION:
        return torch.mm(x, y, out_dtype=torch.float32)
    return x @ y


def add_product(acc: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
    """acc += x @ y, in place without a product temporary when the GEMM runs in acc's dtype."""
    if x.dtype == acc.dtype:
        acc.addmm_(x, y)
    else:
        acc += mm(x, y).to(acc.dtype)  # fp32 += bf16 in two passes beats one mixed-dtype pass


def _backward_inputs(a: torch.Tensor, g: torch.Tensor, group, compute: str):
    """What a tiled backward starts from: sizes, this rank's row offset, the statistics and GEMM dtypes,
    the incoming gradient in the statistics dtype, and the rows in the GEMM dtype."""
    rank, _ = rank_and_world(group)
    n, d = a.shape
    st, gd = stat_dtype(a), gemm_dtype(a, compute)
    return n, d, rank * n, st, gd, g.to(st), a.detach().to(gd)


def spans(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(n, s + size)) for s in range(0, n, size)]


def row_dots(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype, chunk: int) -> torch.Tensor:
    """⟨x_i, y_i⟩ per row in `dtype`, a row chunk at a time: no [n, D] temporary at the memory peak."""
    return torch.cat([(x[i0:i1].to(dtype) * y[i0:i1].to(dtype)).sum(-1) for i0, i1 in spans(x.shape[0], chunk)])


def in_dtype(acc: torch.Tensor, factor: torch.Tensor, dtype: torch.dtype, chunk: int) -> torch.Tensor:
    """acc·factor in a narrower `dtype`, written over acc's own storage a row chunk at a time: the
    gradient needs no second [n, D] buffer. Row chunk k's bytes land at or below rows already read."""
    acc.mul_(factor)
    if dtype.itemsize >= acc.dtype.itemsize:
        return acc.to(dtype)
    out = acc.view(-1).view(dtype)[: acc.numel()].view(acc.shape)
    for i0, i1 in spans(acc.shape[0], chunk):
        out[i0:i1] = acc[i0:i1].to(dtype)  # the chunk is converted whole before it is written
    return out


def full_tile(i0: int, i1: int, j0: int, j1: int, chunk: int) -> bool:
    """A chunk×chunk tile, the shape whose elementwise work runs fused (`kernels.TileKernel`)."""
    return i1 - i0 == j1 - j0 == chunk


def diagonal_mask(i0: int, i1: int, j0: int, j1: int, device) -> torch.Tensor | None:
    """Bool [i1-i0, j1-j0], true where global row i equals global column j; None if the tile misses it."""
    if max(i0, j0) >= min(i1, j1):
        return None
    return torch.arange(i0, i1, device=device)[:, None] == torch.arange(j0, j1, device=device)[None, :]


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


def positive_scale(s: torch.Tensor) -> float:
    value = float(s)
    if not value > 0:
        raise ValueError(f"logit_scale must be positive (it is exp of the learned log scale), got {value}")
    return value


def softmax_weights(z, l1, l2, beta):
    """d/dz of LSE((1+β)z) − LSE(βz) given both LSEs: (1+β)·softmax((1+β)z) − β·softmax(βz)."""
    if not beta:
        return torch.exp(z - l1)
    return (1 + beta) * torch.exp((1 + beta) * z - l1) - beta * torch.exp(beta * z - l2)


def negative_logits(rows: torch.Tensor, negs: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """s·⟨a_i, n_ik⟩ [n, K] in the statistics dtype (GEMM in the rows' dtype)."""
    return s * torch.einsum("nd,nkd->nk", rows, negs).to(s.dtype)


def sweep_statistics(ag, block, row_offset, col_offset, sf, beta, cols, chunk, r1, r2, c1, c2):
    """One column block's tiles: fold their row LSEs into r1/r2 and their column LSEs into c1/c2."""
    st, dev = r1.dtype, ag.device
    factors = [torch.tensor(f * sf, dtype=st, device=dev) for f in ((1 + beta, beta) if beta else (1.0,))]
    for i0, i1 in spans(ag.shape[0], chunk):
        for j0, j1 in spans(block.shape[0], chunk):
            dots = mm(ag[i0:i1], block[j0:j1].T)
            m = diagonal_mask(i0 + row_offset, i1 + row_offset, j0 + col_offset, j1 + col_offset, dev)
            if m is not None:
                dots = dots.masked_fill(m, NEG_INF)
            for scale, rs, cs in zip(factors, (r1, r2), (c1, c2)):
                row_lse, col_lse = tile_logsumexps(dots, scale, cols, full_tile(i0, i1, j0, j1, chunk))
                rs[i0:i1] = torch.logaddexp(rs[i0:i1], row_lse)
                if cols:
                    cs[j0:j1] = torch.logaddexp(cs[j0:j1], col_lse)


def sweep_gradients(ag, block, col_stats, row_stats, row_offset, col_offset, s, beta, cols, chunk, ga, gb):
    """One column block's tiles in backward: add Σ_j G_ij b_j into `ga` and Σ_i G_ij a_i into `gb`.

    row_stats = (r1, r2, w_row, d_row) of the local rows, col_stats the same four for the block.
    """
    for i0, i1 in spans(ag.shape[0], chunk):
        rows = ag[i0:i1]
        for j0, j1 in spans(block.shape[0], chunk):
            G = gradient_tile(rows, block[j0:j1], (i0, i1), (j0, j1), row_stats, col_stats if cols else None, s,
                              beta, ga.dtype, chunk)
            m = diagonal_mask(i0 + row_offset, i1 + row_offset, j0 + col_offset, j1 + col_offset, ag.device)
            if m is not None:
                G.masked_fill_(m, 0.0)
            add_product(ga[i0:i1], G, block[j0:j1])
            add_product(gb[j0:j1], G.T, rows)
            del G  # before the next tile's product exists: one tile's buffers at a time


def gradient_tile(a, b, rows, cols, row_stats, col_stats, s, beta, st, chunk):
    """G = ∂loss/∂z for the tile a·bᵀ, in the GEMM dtype (a's); its fp32 buffers die with this call."""
    (i0, i1), (j0, j1) = rows, cols
    r1, r2, w_row, d_row = row_stats
    gd, dots = a.dtype, mm(a, b.T)
    if beta:
        zf = s * dots.to(st)
        G = w_row[i0:i1, None] * softmax_weights(zf, r1[i0:i1, None], r2[i0:i1, None], beta)
        if col_stats is not None:
            c1, c2, w_col, _ = col_stats
            G += w_col[None, j0:j1] * softmax_weights(zf, c1[None, j0:j1], c2[None, j0:j1], beta)
        return G.to(gd)
    # v = LSE when β = 0, so w·exp(z − LSE) = exp(z − d): one exp per direction
    d_col = col_stats[3][j0:j1] if col_stats is not None else None
    return softmax_sum(dots, s, d_row[i0:i1], d_col, gd, full=full_tile(i0, i1, j0, j1, chunk))


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
    def forward(ctx, a, b, scale, zd, negs, alpha, beta, cols, chunk, group, compute, ring):
        rank, world = rank_and_world(group)
        n = a.shape[0]
        N = n * world if ring else b.shape[0]
        offset = rank * n
        st, gd = stat_dtype(a), gemm_dtype(a, compute)
        ag = a.detach().to(gd)
        s = scale.detach().to(st)
        sf = positive_scale(s)
        r1, r2 = (torch.full((n,), NEG_INF, device=ag.device, dtype=st) for _ in range(2))
        blocks = Ring([b.detach().to(gd)], group, enabled=ring, part_rows=chunk)
        for col_offset, (block,) in blocks:
            fresh = lambda rows=block.shape[0]: [torch.full((rows,), NEG_INF, device=ag.device, dtype=st)  # noqa: E731
                                                 for _ in range(2)]
            c1, c2 = blocks.take(fresh) if cols else (None, None)
            sweep_statistics(ag, block, offset, col_offset, sf, beta, cols, chunk, r1, r2, c1, c2)
            if cols:
                blocks.give([c1, c2])
        if negs is not None:
            zn = negative_logits(ag, negs.detach().to(gd), s)
            r1 = torch.logaddexp(r1, torch.logsumexp((1 + beta) * zn, 1))
            if beta:
                r2 = torch.logaddexp(r2, torch.logsumexp(beta * zn, 1))
        k = 0 if negs is None else negs.shape[1]
        diagonal = zd is None
        zdf = s * row_dots(ag, _own_rows(b, offset, n, ring), st, chunk) if diagonal else zd.detach().to(st)
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
        ctx.cfg = (alpha, beta, cols, chunk, group, ring, compute, diagonal, None if diagonal else zd.dtype)
        return total

    @staticmethod
    def backward(ctx, g):
        a, b, scale, zdf, negs, r1, r2, v_row, d_row, c1, c2, v_col, d_col = ctx.saved_tensors
        alpha, beta, cols, chunk, group, ring, compute, diagonal, zd_dtype = ctx.cfg
        n, D, offset, st, gd, g, ag = _backward_inputs(a, g, group, compute)
        s = scale.detach().to(st)
        positive_scale(s)
        ga = torch.zeros(n, D, device=ag.device, dtype=st)  # Σ_j G_ij b_j over every column block
        row_stats = (r1, r2, torch.exp(v_row - d_row), d_row)  # w_row: weight of the off-diagonal part
        col_stats = [c1, c2, torch.exp(v_col - d_col), d_col] if cols else []
        blocks = Ring([b.detach().to(gd), *col_stats], group, enabled=ring, part_rows=chunk)
        for col_offset, (block, *stats) in blocks:
            gb, = blocks.take(lambda rows=block.shape[0]: [torch.zeros(rows, D, device=ag.device, dtype=st)])
            sweep_gradients(ag, block, stats, row_stats, offset, col_offset, s, beta, cols, chunk, ga, gb)
            blocks.give([gb])
        gb, = blocks.carried
        gneg = torch.empty_like(negs) if ctx.needs_input_grad[4] else None  # mined negatives come detached
        for i0, i1 in spans(n, chunk) if negs is not None else ():
            nf, rows = negs[i0:i1].detach().to(gd), ag[i0:i1]
            zn = negative_logits(rows, nf, s)
            Gn = row_stats[2][i0:i1, None] * softmax_weights(zn, r1[i0:i1, None], r2[i0:i1, None], beta)
            ga[i0:i1] += torch.einsum("nk,nkd->nd", Gn.to(gd), nf).to(st)
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
                own_gb[i0:i1] += coef[i0:i1, None] * ag[i0:i1]
        gs = row_dots(ga, ag, st, chunk).sum() * g
        ga = in_dtype(ga, g * s, a.dtype, chunk)
        gb = in_dtype(gb, g * s, b.dtype, chunk)
        return ga, gb, gs.reshape(scale.shape).to(scale.dtype), gzd, gneg, None, None, None, None, None, None, None


class SigmoidPairs(torch.autograd.Function):
    """Σ over this rank's rows and all columns of −log σ(y_ij·(s·a_i·b_j + bias)), y = +1 on the diagonal.

    Elementwise, so tiles need no running statistics; hard negatives add K pairs with y = −1 per row.
    Columns `b` as in LogDenominators (all N, or this rank's with `ring`, column gradients then
    travelling back to their owner). Precision as there: GEMMs in the GEMM dtype, softplus,
    sigmoid and sums in fp32.
    """

    @staticmethod
    def forward(ctx, a, b, scale, bias, negs, chunk, group, compute, ring):
        rank, _ = rank_and_world(group)
        n = a.shape[0]
        offset = rank * n
        st, gd = stat_dtype(a), gemm_dtype(a, compute)
        ag = a.detach().to(gd)
        s, t = scale.detach().to(st), bias.detach().to(st).reshape(1)  # 1-element, not 0-dim: adding promotes
        total = torch.zeros((), dtype=st, device=ag.device)
        for col_offset, (block,) in Ring([b.detach().to(gd)], group, enabled=ring, part_rows=chunk):
            for i0, i1 in spans(n, chunk):
                for j0, j1 in spans(block.shape[0], chunk):
                    dots = mm(ag[i0:i1], block[j0:j1].T)
                    # −log σ(−z) = softplus(z) for negatives; the positives' softplus(−z) replaces theirs
                    total += softplus_sum(dots, s, t, full=full_tile(i0, i1, j0, j1, chunk))
                    m = diagonal_mask(i0 + offset, i1 + offset, j0 + col_offset, j1 + col_offset, ag.device)
                    if m is not None:
                        z = dots[m].to(st) * s + t
                        total += (F.softplus(-z) - F.softplus(z)).sum()
        if negs is not None:
            total += F.softplus(negative_logits(ag, negs.detach().to(gd), s) + t).sum()
        ctx.save_for_backward(a, b, scale, bias, negs)
        ctx.cfg = (chunk, group, ring, compute)
        return total

    @staticmethod
    def backward(ctx, g):
        a, b, scale, bias, negs = ctx.saved_tensors
        chunk, group, ring, compute = ctx.cfg
        n, D, offset, st, gd, g, ag = _backward_inputs(a, g, group, compute)
        s, t = scale.detach().to(st), bias.detach().to(st).reshape(1)
        dev = ag.device
        ga = torch.zeros(n, D, device=dev, dtype=st)
        gt = torch.zeros((), dtype=st, device=dev)
        blocks = Ring([b.detach().to(gd)], group, enabled=ring, part_rows=chunk)
        for col_offset, (block,) in blocks:
            gb, = blocks.take(lambda rows=block.shape[0]: [torch.zeros(rows, D, device=dev, dtype=st)])
            for i0, i1 in spans(n, chunk):
                rows = ag[i0:i1]
                for j0, j1 in spans(block.shape[0], chunk):
                    dots = mm(rows, block[j0:j1].T)
                    G, G_sum = sigmoid_tile(dots, s, t, gd, full=full_tile(i0, i1, j0, j1, chunk))  # d softplus/dz
                    gt += G_sum
                    m = diagonal_mask(i0 + offset, i1 + offset, j0 + col_offset, j1 + col_offset, dev)
                    if m is not None:  # positives: −σ(−z), exact where σ(z) − 1 would cancel
                        z = dots[m].to(st) * s + t
                        positive = -torch.sigmoid(-z)
                        G[m] = positive.to(gd)
                        gt += (positive - torch.sigmoid(z)).sum()
                    add_product(ga[i0:i1], G, block[j0:j1])
                    add_product(gb[j0:j1], G.T, rows)
            blocks.give([gb])
        gb, = blocks.carried
        gneg = torch.empty_like(negs) if ctx.needs_input_grad[4] else None  # mined negatives come detached
        for i0, i1 in spans(n, chunk) if negs is not None else ():
            nf, rows = negs[i0:i1].detach().to(gd), ag[i0:i1]
            Gn = torch.sigmoid(negative_logits(rows, nf, s) + t)
            gt += Gn.sum()
            ga[i0:i1] += torch.einsum("nk,nkd->nd", Gn.to(gd), nf).to(st)
            if gneg is not None:
                gneg[i0:i1] = (g * s * Gn)[:, :, None] * rows[:, None, :]
        gs = row_dots(ga, ag, st, chunk).sum() * g
        ga = in_dtype(ga, g * s, a.dtype, chunk)
        gb = in_dtype(gb, g * s, b.dtype, chunk)
        return (ga, gb, gs.reshape(scale.shape).to(scale.dtype), (gt * g).reshape(bias.shape).to(bias.dtype), gneg,
                None, None, None, None)


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
    def forward(ctx, a, scale, zd, chunk, group, compute, *others):
        rank, _ = rank_and_world(group)
        offset = rank * a.shape[0]
        st, gd = stat_dtype(a), gemm_dtype(a, compute)
        with torch.no_grad():
            lse = torch.full((a.shape[0],), NEG_INF, dtype=st, device=a.device)
            for i0, i1, z, mask in _tuple_tiles(a, scale, others, chunk, offset, gd, st):
                lse[i0:i1] = torch.logaddexp(lse[i0:i1], torch.logsumexp(z.masked_fill(mask, NEG_INF).flatten(1), 1))
            d_row = torch.logaddexp(zd.detach().to(st), lse)
        ctx.save_for_backward(a, scale, zd, d_row, *others)
        ctx.cfg = (chunk, offset, gd)
        return d_row.sum()

    @staticmethod
    def backward(ctx, g):
        a, scale, zd, d_row, *others = ctx.saved_tensors
        chunk, offset, gd = ctx.cfg
        st = d_row.dtype
        inputs = (a, scale, *others)
        leaves = [t.detach().to(st).requires_grad_(True) for t in inputs]
        with torch.enable_grad():
            for i0, i1, z, mask in _tuple_tiles(leaves[0], leaves[1], leaves[2:], chunk, offset, gd, st):
                weights = torch.exp(z.detach() - d_row[i0:i1, None, None]).masked_fill(mask, 0.0) * g
                z.backward(weights, retain_graph=True)  # shared casts/prefixes feed several tiles
        gzd = (torch.exp(zd.detach().to(st) - d_row) * g).to(zd.dtype)
        grads = [(leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)).to(t.dtype)
                 for leaf, t in zip(leaves, inputs)]
        return (grads[0], grads[1], gzd, None, None, None, *grads[2:])


def _tuple_tiles(a, scale, others, chunk, offset, gd, st):
    """Yield (i0, i1, logits [rows, prefixes, N] in `st`, positive mask) over all candidate tuples."""
    *prefix_mods, last = [o.to(gd) for o in others]
    n, N, D = a.shape[0], last.shape[0], a.shape[1]
    n_prefix = N ** len(prefix_mods)
    rows = min(n, chunk)
    per_tile = max(1, (chunk * chunk) // (rows * max(N, D)))
    s = scale.to(st)
    af = a.to(gd)
    for p0, p1 in spans(n_prefix, per_tile):
        flat = torch.arange(p0, p1, device=a.device)
        idx = torch.unravel_index(flat, (N,) * len(prefix_mods)) if prefix_mods else ()
        prefix = torch.ones(p1 - p0, D, dtype=gd, device=a.device)
        for mod, j in zip(prefix_mods, idx):
            prefix = prefix * mod[j]
        for i0, i1 in spans(n, rows):
            q = af[i0:i1, None, :] * prefix[None]
            z = s * (q.reshape(-1, D) @ last.T).to(st).reshape(i1 - i0, p1 - p0, N)
            g = torch.arange(i0, i1, device=a.device) + offset
            same_prefix = torch.ones(i1 - i0, p1 - p0, dtype=torch.bool, device=a.device)
            for j in idx:
                same_prefix &= j[None, :] == g[:, None]
            mask = same_prefix[:, :, None] & (torch.arange(N, device=a.device)[None, None, :] == g[:, None, None])
            yield i0, i1, z, mask
