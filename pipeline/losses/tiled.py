"""Tiled similarity engines: the B×B logits exist one chunk×chunk tile at a time, forward and backward.

Each engine is a custom autograd Function that sweeps tiles once in forward (keeping only
per-row / per-column statistics) and recomputes every tile in backward to form the gradient
with two GEMMs per tile. Inputs of any float dtype accumulate in fp32 (fp64 stays fp64).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.losses.distributed import gather_rows, rank_and_world

NEG_INF = float("-inf")
DEFAULT_CHUNK = 1024  # 1024² fp32 logits = 4 MiB a tile: GEMMs large enough to run at full speed on CPU


def accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def spans(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(n, s + size)) for s in range(0, n, size)]


def diagonal_mask(i0: int, i1: int, j0: int, j1: int, offset: int, device) -> torch.Tensor | None:
    """Bool [i1-i0, j1-j0], true where global row (offset + i) equals column j; None if the tile misses it."""
    if max(i0 + offset, j0) >= min(i1 + offset, j1):
        return None
    rows = torch.arange(i0, i1, device=device)[:, None] + offset
    return rows == torch.arange(j0, j1, device=device)[None, :]


def softmax_weights(z, l1, l2, beta):
    """d/dz of LSE((1+β)z) − LSE(βz) given both LSEs: (1+β)·softmax((1+β)z) − β·softmax(βz)."""
    if not beta:
        return torch.exp(z - l1)
    return (1 + beta) * torch.exp((1 + beta) * z - l1) - beta * torch.exp(beta * z - l2)


class LogDenominators(torch.autograd.Function):
    """Σ over this rank's rows of the row log-denominators (+ Σ over its columns of the column ones).

    Inputs: local rows `a` [n, D]; all columns `b` [N, D] (every rank's, gathered by the caller);
    the positive logits `zd` [n] (plain autograd outside, so any positive can be used, e.g.
    Symile's true MIP); per-row hard negatives [n, K, D]. Row i's positive is column
    rank·n + i. With HN-NCE (α, β) the log-denominator is
    log(α·e^{z_ii} + N_neg · Σ_{j≠i} e^{(1+β)z_ij} / Σ_{j≠i} e^{βz_ij}); α=1, β=0 is InfoNCE.
    Tiles of chunk×chunk logits are made, reduced by online log-sum-exp and dropped; backward
    makes them again. Only O(n + N) statistics are kept.
    """

    @staticmethod
    def forward(ctx, a, b, scale, zd, negs, alpha, beta, cols, chunk, group):
        rank, _ = rank_and_world(group)
        n, N = a.shape[0], b.shape[0]
        offset = rank * n
        acc = accumulation_dtype(a)
        af, bf = a.detach().to(acc), b.detach().to(acc)
        s = scale.detach().to(acc)
        dev = af.device
        r1 = torch.full((n,), NEG_INF, device=dev, dtype=acc)
        r2 = torch.full((n,), NEG_INF, device=dev, dtype=acc)
        c1 = torch.full((N,), NEG_INF, device=dev, dtype=acc)
        c2 = torch.full((N,), NEG_INF, device=dev, dtype=acc)
        for i0, i1 in spans(n, chunk):
            for j0, j1 in spans(N, chunk):
                z = s * (af[i0:i1] @ bf[j0:j1].T)
                m = diagonal_mask(i0, i1, j0, j1, offset, dev)
                if m is not None:
                    z = z.masked_fill(m, NEG_INF)
                zb = z if not beta else (1 + beta) * z
                r1[i0:i1] = torch.logaddexp(r1[i0:i1], torch.logsumexp(zb, 1))
                if cols:
                    c1[j0:j1] = torch.logaddexp(c1[j0:j1], torch.logsumexp(zb, 0))
                if beta:
                    r2[i0:i1] = torch.logaddexp(r2[i0:i1], torch.logsumexp(beta * z, 1))
                    if cols:
                        c2[j0:j1] = torch.logaddexp(c2[j0:j1], torch.logsumexp(beta * z, 0))
        if negs is not None:
            zn = s * torch.einsum("nd,nkd->nk", af, negs.detach().to(acc))
            r1 = torch.logaddexp(r1, torch.logsumexp((1 + beta) * zn, 1))
            if beta:
                r2 = torch.logaddexp(r2, torch.logsumexp(beta * zn, 1))
        k = 0 if negs is None else negs.shape[1]
        zdf = zd.detach().to(acc)
        log_alpha = math.log(alpha) if alpha > 0 else NEG_INF
        v_row = r1 if not beta else math.log(N - 1 + k) + r1 - r2
        d_row = torch.logaddexp(log_alpha + zdf, v_row)
        total = d_row.sum()
        v_col = d_col = None
        if cols:
            if group is not None:
                c1 = torch.logsumexp(gather_rows(c1[None], group), 0)
                if beta:
                    c2 = torch.logsumexp(gather_rows(c2[None], group), 0)
            v_col = c1 if not beta else math.log(N - 1) + c1 - c2
            d_col_local = torch.logaddexp(log_alpha + zdf, v_col[offset:offset + n])
            total = total + d_col_local.sum()
            d_col = gather_rows(d_col_local, group)
        ctx.save_for_backward(a, b, scale, zd, negs, r1, r2, v_row, d_row, c1, c2, v_col, d_col)
        ctx.cfg = (alpha, beta, cols, chunk, group, offset, N)
        return total

    @staticmethod
    def backward(ctx, g):
        a, b, scale, zd, negs, r1, r2, v_row, d_row, c1, c2, v_col, d_col = ctx.saved_tensors
        alpha, beta, cols, chunk, group, offset, N = ctx.cfg
        acc = accumulation_dtype(a)
        g = g.to(acc)
        af, bf = a.detach().to(acc), b.detach().to(acc)
        s = scale.detach().to(acc)
        n = a.shape[0]
        dev = af.device
        ga = torch.zeros_like(af)
        gb = torch.zeros_like(bf)
        gs = torch.zeros((), device=dev, dtype=acc)
        w_row = torch.exp(v_row - d_row)  # weight of the off-diagonal part in each row
        w_col = torch.exp(v_col - d_col) if cols else None
        for i0, i1 in spans(n, chunk):
            for j0, j1 in spans(N, chunk):
                z = s * (af[i0:i1] @ bf[j0:j1].T)
                G = w_row[i0:i1, None] * softmax_weights(z, r1[i0:i1, None], r2[i0:i1, None], beta)
                if cols:
                    G = G + w_col[None, j0:j1] * softmax_weights(z, c1[None, j0:j1], c2[None, j0:j1], beta)
                m = diagonal_mask(i0, i1, j0, j1, offset, dev)
                if m is not None:
                    G = G.masked_fill(m, 0.0)
                gs += (G * z).sum() * (g / s)
                G = G * (g * s)
                ga[i0:i1] += G @ bf[j0:j1]
                gb[j0:j1] += G.T @ af[i0:i1]
        gneg = None
        if negs is not None:
            nf = negs.detach().to(acc)
            zn = s * torch.einsum("nd,nkd->nk", af, nf)
            Gn = g * w_row[:, None] * softmax_weights(zn, r1[:, None], r2[:, None], beta)
            ga += s * torch.einsum("nk,nkd->nd", Gn, nf)
            gneg = (s * Gn[:, :, None] * af[:, None, :]).to(negs.dtype)
            gs += (Gn * zn).sum() / s
        log_alpha = math.log(alpha) if alpha > 0 else NEG_INF
        zdf = zd.detach().to(acc)
        gzd = torch.exp(log_alpha + zdf - d_row)
        if cols:
            gzd = gzd + torch.exp(log_alpha + zdf - d_col[offset:offset + n])
        gzd = (g * gzd).to(zd.dtype)
        return (ga.to(a.dtype), gb.to(b.dtype), gs.reshape(scale.shape).to(scale.dtype), gzd, gneg,
                None, None, None, None, None)


class SigmoidPairs(torch.autograd.Function):
    """Σ over this rank's rows and all columns of −log σ(y_ij·(s·a_i·b_j + bias)), y = +1 on the diagonal.

    Elementwise, so tiles need no running statistics; hard negatives add K pairs with y = −1 per row.
    """

    @staticmethod
    def forward(ctx, a, b, scale, bias, negs, chunk, group):
        rank, _ = rank_and_world(group)
        n, N = a.shape[0], b.shape[0]
        offset = rank * n
        acc = accumulation_dtype(a)
        af, bf = a.detach().to(acc), b.detach().to(acc)
        s, t = scale.detach().to(acc), bias.detach().to(acc)
        total = torch.zeros((), dtype=acc, device=af.device)
        for i0, i1 in spans(n, chunk):
            for j0, j1 in spans(N, chunk):
                z = s * (af[i0:i1] @ bf[j0:j1].T) + t
                m = diagonal_mask(i0, i1, j0, j1, offset, af.device)
                # −log σ(−x) = softplus(x) for negatives; positives flip the sign
                total += F.softplus(z if m is None else torch.where(m, -z, z)).sum()
        if negs is not None:
            total += F.softplus(s * torch.einsum("nd,nkd->nk", af, negs.detach().to(acc)) + t).sum()
        ctx.save_for_backward(a, b, scale, bias, negs)
        ctx.cfg = (chunk, offset)
        return total

    @staticmethod
    def backward(ctx, g):
        a, b, scale, bias, negs = ctx.saved_tensors
        chunk, offset = ctx.cfg
        acc = accumulation_dtype(a)
        g = g.to(acc)
        af, bf = a.detach().to(acc), b.detach().to(acc)
        s, t = scale.detach().to(acc), bias.detach().to(acc)
        n, N = af.shape[0], bf.shape[0]
        ga, gb = torch.zeros_like(af), torch.zeros_like(bf)
        gs = torch.zeros((), dtype=acc, device=af.device)
        gt = torch.zeros((), dtype=acc, device=af.device)
        for i0, i1 in spans(n, chunk):
            for j0, j1 in spans(N, chunk):
                dots = af[i0:i1] @ bf[j0:j1].T
                z = s * dots + t
                m = diagonal_mask(i0, i1, j0, j1, offset, af.device)
                G = torch.sigmoid(z) if m is None else torch.where(m, torch.sigmoid(z) - 1, torch.sigmoid(z))
                G = G * g  # d softplus(±z)/dz
                gs += (G * dots).sum()
                gt += G.sum()
                ga[i0:i1] += s * (G @ bf[j0:j1])
                gb[j0:j1] += s * (G.T @ af[i0:i1])
        gneg = None
        if negs is not None:
            nf = negs.detach().to(acc)
            dots = torch.einsum("nd,nkd->nk", af, nf)
            G = torch.sigmoid(s * dots + t) * g
            gs += (G * dots).sum()
            gt += G.sum()
            ga += s * torch.einsum("nk,nkd->nd", G, nf)
            gneg = (s * G[:, :, None] * af[:, None, :]).to(negs.dtype)
        return (ga.to(a.dtype), gb.to(b.dtype), gs.reshape(scale.shape).to(scale.dtype),
                gt.reshape(bias.shape).to(bias.dtype), gneg, None, None)


class TupleLogDenominators(torch.autograd.Function):
    """Symile "n_squared": Σ over this rank's anchor rows of log Σ over ALL candidate tuples.

    Candidates for anchor row i are every tuple (j_1..j_{M-1}) of rows of the other modalities,
    scored by the multilinear product s·Σ_d a_id Π_m r_m[j_m]_d; the positive (the tuple of row
    i itself) enters through `zd`. The B × B^(M-1) logits are tiled over (anchor rows × tuple
    prefixes × last-modality rows); backward recomputes each tile under autograd and feeds it
    its softmax weights, so no tile outlives its step.
    """

    @staticmethod
    def forward(ctx, a, scale, zd, chunk, group, *others):
        rank, _ = rank_and_world(group)
        offset = rank * a.shape[0]
        with torch.no_grad():
            lse = torch.full((a.shape[0],), NEG_INF, dtype=accumulation_dtype(a), device=a.device)
            for i0, i1, z, mask in _tuple_tiles(a, scale, others, chunk, offset):
                lse[i0:i1] = torch.logaddexp(lse[i0:i1], torch.logsumexp(z.masked_fill(mask, NEG_INF).flatten(1), 1))
            d_row = torch.logaddexp(zd.detach().to(lse.dtype), lse)
        ctx.save_for_backward(a, scale, zd, d_row, *others)
        ctx.cfg = (chunk, offset)
        return d_row.sum()

    @staticmethod
    def backward(ctx, g):
        a, scale, zd, d_row, *others = ctx.saved_tensors
        chunk, offset = ctx.cfg
        leaves = [t.detach().requires_grad_(True) for t in (a, scale, *others)]
        with torch.enable_grad():
            for i0, i1, z, mask in _tuple_tiles(leaves[0], leaves[1], leaves[2:], chunk, offset):
                weights = torch.exp(z.detach() - d_row[i0:i1, None, None]).masked_fill(mask, 0.0) * g
                z.backward(weights, retain_graph=True)  # shared casts/prefixes feed several tiles
        gzd = (torch.exp(zd.detach().to(d_row.dtype) - d_row) * g).to(zd.dtype)
        grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]
        return (grads[0], grads[1], gzd, None, None, *grads[2:])


def _tuple_tiles(a, scale, others, chunk, offset):
    """Yield (i0, i1, logits [rows, prefixes, N], positive mask) over all candidate tuples."""
    acc = accumulation_dtype(a)
    *prefix_mods, last = [o.to(acc) for o in others]
    n, N, D = a.shape[0], last.shape[0], a.shape[1]
    n_prefix = N ** len(prefix_mods)
    rows = min(n, chunk)
    per_tile = max(1, (chunk * chunk) // (rows * max(N, D)))
    s = scale.to(acc)
    af = a.to(acc)
    for p0, p1 in spans(n_prefix, per_tile):
        flat = torch.arange(p0, p1, device=a.device)
        idx = torch.unravel_index(flat, (N,) * len(prefix_mods)) if prefix_mods else ()
        prefix = torch.ones(p1 - p0, D, dtype=acc, device=a.device)
        for mod, j in zip(prefix_mods, idx):
            prefix = prefix * mod[j]
        for i0, i1 in spans(n, rows):
            q = af[i0:i1, None, :] * prefix[None]
            z = s * (q.reshape(-1, D) @ last.T).reshape(i1 - i0, p1 - p0, N)
            g = torch.arange(i0, i1, device=a.device) + offset
            same_prefix = torch.ones(i1 - i0, p1 - p0, dtype=torch.bool, device=a.device)
            for j in idx:
                same_prefix &= j[None, :] == g[:, None]
            mask = same_prefix[:, :, None] & (torch.arange(N, device=a.device)[None, None, :] == g[:, None, None])
            yield i0, i1, z, mask
