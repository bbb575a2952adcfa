"""What each tower needs from the data path: its modality's preprocessor, built from the tower's description."""
from __future__ import annotations

from typing import Optional

from pipeline.data.config import DataConfig
from pipeline.registry import MODALITIES


def tower_preprocessors(model, data: Optional[DataConfig], train: bool) -> dict:
    """`data` (the run's data section) sets per-modality options such as clip length; None (eval) takes the
    defaults the towers imply."""
    return {m: MODALITIES.get(m, "model.towers").obj.preprocessor(tower.preprocess,
                                                                   data.modality(m) if data else None, train)
            for m, tower in model.towers.items()}
