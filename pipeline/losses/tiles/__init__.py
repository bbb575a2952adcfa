"""Tile engines: the B×B logits exist one chunk×chunk tile at a time, forward and backward.

`TileSpec` (spec.py) is resolved once per call from a loss section's common keys; every engine reads
its tile size, precision and column exchange from it. Engines: `LogDenominators` (InfoNCE, HN-NCE,
Symile n), `SigmoidPairs` (SigLIP), `TupleLogDenominators` (Symile n_squared), `AnchorLogSumExp`
(global_clip), `top_k_negatives` (mining). `kernels.py` holds the elementwise work fused per tile.
"""
from pipeline.losses.tiles.anchor_lse import AnchorLogSumExp
from pipeline.losses.tiles.log_denominators import LogDenominators
from pipeline.losses.tiles.sigmoid_pairs import SigmoidPairs
from pipeline.losses.tiles.spec import TileSpec, accumulator_dtype, default_chunk
from pipeline.losses.tiles.top_k import top_k_negatives
from pipeline.losses.tiles.tuples import TupleLogDenominators

__all__ = ["AnchorLogSumExp", "LogDenominators", "SigmoidPairs", "TileSpec", "TupleLogDenominators",
           "accumulator_dtype", "default_chunk", "top_k_negatives"]
