"""Zero-shot evaluation: classification, retrieval and joint (Symile) prediction for any modality pair.

Reads CLIP_benchmark's local `wds/` layout (or the project's own shards), preprocesses exactly like
open_clip's eval transforms and reports CLIP_benchmark's metric names, so numbers are comparable with
`clip_benchmark eval` on an export. Scores mmclip runs and external models (open_clip, transformers;
pipeline.eval.models) with the same code. Never trains or changes a model.
"""
from typing import TYPE_CHECKING

from pipeline.lazy import lazy_exports

if TYPE_CHECKING:  # for readers and type checkers; at run time the name loads on first use
    from pipeline.eval.run import evaluate_tasks

__getattr__ = lazy_exports(__name__, {"evaluate_tasks": "pipeline.eval.run"})

__all__ = ["evaluate_tasks"]
