"""SigLIP's tile engine: Σ of −log σ(±z) over every pair of the B×B logits, one tile at a time."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.losses.comm import Ring
from pipeline.losses.tiles.kernels import sigmoid_tile, softplus_sum
from pipeline.losses.tiles.ops import (
    add_product,
    backward_inputs,
    diagonal_mask,
    full_tile,
    in_dtype,
    mm,
    negative_logits,
    row_dots,
    spans,
)
from pipeline.losses.tiles.spec import TileSpec, accumulator_dtype


class SigmoidPairs(torch.autograd.Function):
    """Σ over this rank's rows and all columns of −log σ(y_ij·(s·a_i·b_j + bias)), y = +1 on the diagonal.

    Elementwise, so tiles need no running statistics; hard negatives add K pairs with y = −1 per row.
    Columns `b` as in LogDenominators (all N, or this rank's with `ring`, column gradients then
    travelling back to their owner). Precision as there: GEMMs in the GEMM dtype, softplus,
    sigmoid and sums in fp32.
    """

    @staticmethod
    def forward(ctx, a, b, scale, bias, negs, spec: TileSpec):
        rank, chunk, group, ring = spec.rank, spec.chunk, spec.group, spec.ring
        n = a.shape[0]
        offset = rank * n
        acc_dtype, mm_dtype = accumulator_dtype(a), spec.gemm_dtype(a)
        a_mm = a.detach().to(mm_dtype)
        s, t = scale.detach().to(acc_dtype), bias.detach().to(acc_dtype).reshape(1)  # 1-element, not 0-dim: adding promotes
        total = torch.zeros((), dtype=acc_dtype, device=a_mm.device)
        for col_offset, (block,) in Ring([b.detach().to(mm_dtype)], group, enabled=ring, part_rows=chunk):
            for i0, i1 in spans(n, chunk):
                for j0, j1 in spans(block.shape[0], chunk):
                    dots = mm(a_mm[i0:i1], block[j0:j1].T)
                    # −log σ(−z) = softplus(z) for negatives; the positives' softplus(−z) replaces theirs
                    total += softplus_sum(dots, s, t, full=full_tile(i0, i1, j0, j1, chunk))
                    m = diagonal_mask(i0 + offset, i1 + offset, j0 + col_offset, j1 + col_offset, a_mm.device)
                    if m is not None:
                        z = dots[m].to(acc_dtype) * s + t
                        total += (F.softplus(-z) - F.softplus(z)).sum()
        if negs is not None:
            total += F.softplus(negative_logits(a_mm, negs.detach().to(mm_dtype), s) + t).sum()
        ctx.save_for_backward(a, b, scale, bias, negs)
        ctx.spec = spec
        return total

    @staticmethod
    def backward(ctx, g):
        a, b, scale, bias, negs = ctx.saved_tensors
        spec = ctx.spec
        chunk, group, ring = spec.chunk, spec.group, spec.ring
        n, D, offset, acc_dtype, mm_dtype, g, a_mm = backward_inputs(a, g, spec)
        s, t = scale.detach().to(acc_dtype), bias.detach().to(acc_dtype).reshape(1)
        dev = a_mm.device
        ga = torch.zeros(n, D, device=dev, dtype=acc_dtype)
        gt = torch.zeros((), dtype=acc_dtype, device=dev)
        blocks = Ring([b.detach().to(mm_dtype)], group, enabled=ring, part_rows=chunk)
        for col_offset, (block,) in blocks:
            gb, = blocks.take(lambda rows=block.shape[0]: [torch.zeros(rows, D, device=dev, dtype=acc_dtype)])
            for i0, i1 in spans(n, chunk):
                rows = a_mm[i0:i1]
                for j0, j1 in spans(block.shape[0], chunk):
                    dots = mm(rows, block[j0:j1].T)
                    G, G_sum = sigmoid_tile(dots, s, t, mm_dtype, full=full_tile(i0, i1, j0, j1, chunk))  # d softplus/dz
                    gt += G_sum
                    m = diagonal_mask(i0 + offset, i1 + offset, j0 + col_offset, j1 + col_offset, dev)
                    if m is not None:  # positives: −σ(−z), exact where σ(z) − 1 would cancel
                        z = dots[m].to(acc_dtype) * s + t
                        positive = -torch.sigmoid(-z)
                        G[m] = positive.to(mm_dtype)
                        gt += (positive - torch.sigmoid(z)).sum()
                    add_product(ga[i0:i1], G, block[j0:j1])
                    add_product(gb[j0:j1], G.T, rows)
            blocks.give([gb])
        gb, = blocks.carried
        gneg = torch.empty_like(negs) if ctx.needs_input_grad[4] else None  # mined negatives come detached
        if negs is not None:
            for i0, i1 in spans(n, chunk):
                nf, rows = negs[i0:i1].detach().to(mm_dtype), a_mm[i0:i1]
                Gn = torch.sigmoid(negative_logits(rows, nf, s) + t)
                gt += Gn.sum()
                ga[i0:i1] += torch.einsum("nk,nkd->nd", Gn.to(mm_dtype), nf).to(acc_dtype)
                if gneg is not None:
                    gneg[i0:i1] = (g * s * Gn)[:, :, None] * rows[:, None, :]
        gs = row_dots(ga, a_mm, acc_dtype, chunk).sum() * g
        ga = in_dtype(ga, g * s, a.dtype, chunk)
        gb = in_dtype(gb, g * s, b.dtype, chunk)
        return (ga, gb, gs.reshape(scale.shape).to(scale.dtype), (gt * g).reshape(bias.shape).to(bias.dtype), gneg,
                None)
