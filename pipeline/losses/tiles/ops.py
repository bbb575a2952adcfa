"""Small operations every tile engine shares: tile spans, the diagonal's mask, GEMMs into accumulators."""
from __future__ import annotations

import torch

from pipeline.losses.tiles.spec import LOW_PRECISION, TileSpec, accumulator_dtype

NEG_INF = float("-inf")


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


def backward_inputs(a: torch.Tensor, g: torch.Tensor, spec: TileSpec):
    """What a tiled backward starts from: sizes, this rank's row offset, the accumulator and GEMM dtypes,
    the incoming gradient in the accumulator dtype, and the rows in the GEMM dtype."""
    n, d = a.shape
    acc_dtype, mm_dtype = accumulator_dtype(a), spec.gemm_dtype(a)
    return n, d, spec.rank * n, acc_dtype, mm_dtype, g.to(acc_dtype), a.detach().to(mm_dtype)


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


def positive_scale(s: torch.Tensor) -> float:
    value = float(s)
    if not value > 0:
        raise ValueError(f"logit_scale must be positive (it is exp of the learned log scale), got {value}")
    return value


def negative_logits(rows: torch.Tensor, negs: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """s·⟨a_i, n_ik⟩ [n, K] in the statistics dtype (GEMM in the rows' dtype)."""
    return s * torch.einsum("nd,nkd->nk", rows, negs).to(s.dtype)
