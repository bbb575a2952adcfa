"""Each modality's transform for the input a tower describes: where the data path's preprocessing is built."""
from __future__ import annotations

from typing import Any, Optional

from pipeline.data.config import DataConfig
from pipeline.modalities.base import Preprocessor
from pipeline.registry import MODALITIES


def preprocessors(inputs: dict[str, Any], data: Optional[DataConfig], train: bool) -> dict[str, Preprocessor]:
    """`inputs`: each modality's input description (`MultiModalCLIP.inputs()`, a tower's `preprocess`).
    `data` (the run's data section) sets per-modality options such as clip length; None (eval) takes the
    defaults the descriptions imply."""
    return {m: MODALITIES.get(m, "model.towers").obj.preprocessor(spec, data.modality(m) if data else None, train)
            for m, spec in inputs.items()}
