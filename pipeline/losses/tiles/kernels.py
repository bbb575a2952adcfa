"""The elementwise work on one logits tile, fused by torch.compile on full tiles.

After a tile's GEMM, eager torch passes over the tile once per op (convert, shift, exp, sum,
add, convert back): 5–7 reads and writes of a 4 MiB fp32 tile. Inductor fuses each function
below into one loop (two for the forward's row and column sums) over the GEMM's output, fp32
arithmetic in registers, on CPU and CUDA alike (`mmclip bench loss` measures the losses).

Which tiles: full chunk×chunk tiles of at least `MIN_FUSED` elements in bf16, fp16 or fp32.
Shapes are static, so a run compiles each function once per tile size and dtype (seconds each
on a cold cache; inductor's on-disk cache makes later processes start faster). Edge
tiles, small chunks and fp64 run the same functions eagerly: there a compile would not pay.
If inductor cannot build here (no C++ compiler on a CPU node, no triton beside CUDA), one
warning says so and every tile runs eagerly from then on, with the same results (pipeline.compiled).
"""
from __future__ import annotations

import functools

import torch

from pipeline.compiled import Compiled

MIN_FUSED = 256 * 256


class TileKernel:
    """`fn(dots, ...)`, compiled for full tiles (pipeline.compiled: eager where inductor cannot build) and eager
    for the rest."""

    def __init__(self, fn):
        self.fn, self.compiled = fn, Compiled(fn)
        functools.update_wrapper(self, fn)

    def __call__(self, dots: torch.Tensor, *args, full: bool):
        if full and dots.numel() >= MIN_FUSED and dots.dtype != torch.float64:
            return self.compiled(dots, *args)
        return self.fn(dots, *args)


@TileKernel
def exp_sums(dots: torch.Tensor, scale: torch.Tensor, cols: bool):
    """Row log-sum-exps of z = scale·dots in scale's dtype and, with `cols`, the tile's maximum `top`
    and each column's Σ_i exp(z_ij − top). Two exps per element rather than one exponential kept for
    both sums: a kept fp32 tile costs more memory traffic than the second exp, fused."""
    z = dots.to(scale.dtype) * scale
    m = z.amax(1).clamp(min=torch.finfo(scale.dtype).min)  # a fully masked row: finite shift
    rows = m + torch.exp(z - m[:, None]).sum(1).log()
    if not cols:
        return rows, None, None
    top = m.max()
    return rows, top, torch.exp(z - top).sum(0)


@TileKernel
def softmax_sum(dots: torch.Tensor, scale: torch.Tensor, d_row: torch.Tensor, d_col: torch.Tensor | None,
                out_dtype: torch.dtype):
    """exp(z − d_row_i) + exp(z − d_col_j) for z = scale·dots (no column term without d_col), in
    `out_dtype`: ∂loss/∂z of an InfoNCE tile given its log-denominators."""
    z = dots.to(scale.dtype) * scale
    G = torch.exp(z - d_row[:, None])
    if d_col is not None:
        G = G + torch.exp(z - d_col[None, :])
    return G.to(out_dtype)


def softplus(z: torch.Tensor) -> torch.Tensor:
    """log(1 + e^z) = max(z, 0) + log1p(e^−|z|), with Kahan's log1p(x) = log(u)·x/(u − 1), u = 1 + x
    (exact to a few ulps): torch's softplus and log1p run a scalar log1p on CPU, 6× slower fused."""
    x = torch.exp(-z.abs())
    u = 1 + x
    return z.clamp(min=0) + torch.where(u == 1, x, torch.log(u) * x / (u - 1))


@TileKernel
def softplus_sum(dots: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor):
    """Σ softplus(scale·dots + bias) in scale's dtype: the sigmoid loss of a tile read as all negatives."""
    return softplus(dots.to(scale.dtype) * scale + bias).sum()


@TileKernel
def sigmoid_tile(dots: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, out_dtype: torch.dtype):
    """σ(scale·dots + bias) in `out_dtype` and its sum in scale's dtype: ∂loss/∂z of that all-negative
    tile and its part of ∂loss/∂bias."""
    G = torch.sigmoid(dots.to(scale.dtype) * scale + bias)
    return G.to(out_dtype), G.sum()
