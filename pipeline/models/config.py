"""The `model:` section: the embedding width and one tower per modality (a registered kind each)."""
from __future__ import annotations

from typing import Any, Optional

from pydantic import Field, model_validator

from pipeline.errors import UserError
from pipeline.registry import MODALITIES, TOWERS
from pipeline.section import Section


class TowerConfig(Section):
    """One encoder. `kind` picks the registered builder (pipeline.registry.TOWERS); the other keys go to it."""

    kind: str
    name: Optional[str] = Field(None, description="timm model name, or a local transformers path/config")
    pretrained: Optional[str] = Field(None, description="local safetensors file or folder: the tower's, an "
                                      "open_clip model's, or a timm/transformers checkpoint")
    options: dict[str, Any] = Field(default_factory=dict, description="passed to the builder")


class ModelConfig(Section):
    embed_dim: int = Field(gt=0)
    towers: dict[str, TowerConfig]
    init_logit_scale: float = Field(2.6592, description="log of the initial multiplier (ln 1/0.07)")
    init_logit_bias: Optional[float] = Field(None, description="sigmoid loss bias init (SigLIP: -10)")
    plugins: list[str] = Field(default_factory=list, description="set from the run's plugins:, so that a saved "
                               "model's config can be loaded on its own")

    @model_validator(mode="after")
    def _registered_towers(self):
        if len(self.towers) < 2:
            raise ValueError(f"needs at least two towers, got {sorted(self.towers)}")
        for modality, tower in self.towers.items():
            if modality not in MODALITIES:
                raise ValueError(f"model.towers.{modality}: unknown modality; allowed: {MODALITIES.names()}")
            try:
                entry = TOWERS.get(tower.kind, f"model.towers.{modality}.kind")
            except UserError as exc:
                raise ValueError(str(exc)) from None
            if entry.info["modality"] != modality:
                allowed = [n for n in TOWERS.names() if TOWERS.get(n, "").info["modality"] == modality]
                raise ValueError(f"model.towers.{modality}.kind: {tower.kind!r} is a {entry.info['modality']} tower, "
                                 f"not {modality}; allowed: {allowed}")
        return self
