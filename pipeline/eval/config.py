"""The `eval:` section: zero-shot tasks run during training and by `mmclip eval`."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from pipeline.section import Section


class EvalTask(Section):
    task: Literal["zeroshot_classification", "zeroshot_retrieval", "symile_classification", "compositional_probe"]
    dataset: str = Field(description="CLIP_benchmark wds root or project shards")
    modality: str = "image"
    name: Optional[str] = None


class EvalConfig(Section):
    every_steps: Optional[int] = Field(default=None, gt=0)
    batch_size: int = Field(default=256, gt=0)
    tasks: list[EvalTask] = Field(default_factory=list)
