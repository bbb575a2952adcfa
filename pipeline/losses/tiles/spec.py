"""`TileSpec`: how a loss's B×B logits are cut into tiles and how its columns reach this rank, resolved once.

Precision. Tile GEMMs run in the *GEMM dtype*: the features' own dtype (bf16/fp16) with
`compute_dtype="auto"`, fp32 with `compute_dtype="fp32"` (inputs cast on entry), fp64 for fp64
inputs. Running log-sum-exps, softmax weights, scale/bias gradients, feature-gradient
accumulators and every statistic stay in the *accumulator dtype*, fp32 (fp64 for fp64 inputs);
gradients come back in the inputs' dtypes. On CUDA a low-precision GEMM writes fp32 logits
(`torch.mm(..., out_dtype=torch.float32)`); CPU has no such kernel, so there each logit is rounded
to bf16 once, as under open_clip's amp_bf16 autocast. Against a float64 evaluation of the same bf16
inputs that costs (B = 4,096, D = 512, s = 100, `mmclip bench loss --dtype bf16`) a loss relative
error of 4e-5, feature-gradient cosine 0.99997 and a largest gradient error of 1.2% of the largest
entry, the order of open_clip's amp_bf16 (2e-5, 0.99995, 1.6%).

Tile size per device (`default_chunk`): 1024 on CPU (a 1024×1024 fp32 tile is 4 MiB, large
enough for full-speed bf16 and fp32 GEMMs and small enough to stay in the last-level cache for
the elementwise passes); 4096 on CUDA, where larger GEMMs are needed to fill the device
(a choice, not measured here: no GPU on the benchmark machine).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pipeline.losses.comm import rank_and_world, use_ring

LOW_PRECISION = (torch.bfloat16, torch.float16)
COMPUTE_DTYPES = ("auto", "fp32")


def default_chunk(device: torch.device) -> int:
    return 4096 if device.type == "cuda" else 1024


def accumulator_dtype(t: torch.Tensor) -> torch.dtype:
    """Statistics and accumulators: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class TileSpec:
    """The keys every loss section shares, resolved for one call: the engines read nothing else."""

    chunk: int  # rows (and columns) of one tile
    compute_dtype: str  # "auto" (GEMMs in the features' dtype) or "fp32"
    ring: bool  # columns pass around a ring of ranks (else every rank holds all of them)
    group: Any = None  # the process group; None for one process

    @classmethod
    def resolve(cls, device: torch.device, chunk_size: int | None = None, compute_dtype: str = "auto",
                distributed: str = "auto", group=None) -> TileSpec:
        """From a loss section's `chunk_size`, `compute_dtype` and `distributed` (plus the group and device)."""
        if compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {compute_dtype!r}")
        return cls(chunk_size or default_chunk(device), compute_dtype, use_ring(distributed, group), group)

    def gemm_dtype(self, t: torch.Tensor) -> torch.dtype:
        """The dtype `t`'s tile GEMMs run in."""
        if self.compute_dtype == "auto" and t.dtype in LOW_PRECISION:
            return t.dtype
        return accumulator_dtype(t)

    @property
    def rank(self) -> int:
        return rank_and_world(self.group)[0]

    @property
    def world(self) -> int:
        return rank_and_world(self.group)[1]
