"""The `data:` section: which shards, how they are read, shuffled and batched; `data.<modality>` sections
are the modalities' own (pipeline/modalities)."""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.registry import MODALITIES
from pipeline.section import Section, validate_section

class HardNegatives(Section):
    modality: str = Field("text", description="the modality of the negatives (decoded and preprocessed like it)")
    extension: str = "neg.txt"
    k: int = Field(1, ge=1, description="negatives per sample; extra ones are dropped, missing ones repeat")


class DataConfig(Section):
    """Besides these keys, `data.<modality>` sections (e.g. `data.audio.sample_rate`) configure each modality;
    their keys are the modality's own (pipeline/modalities)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    train: str = Field(description="shard spec: brace expansion, several sources joined with '::'")
    train_weights: Optional[list[float]] = None
    val: Optional[str] = None
    resampled: bool = True
    num_samples: Optional[int] = Field(None, gt=0, description="epoch size; default from sizes.json")
    batch_size: int = Field(gt=0, description="global batch (all ranks together)")
    workers: int = Field(2, ge=0)
    shuffle_buffer: int = Field(1000, ge=0, description="samples each loader worker shuffles among")
    shuffle_buffer_mib: float = Field(512, gt=0, description="bound on the bytes that buffer holds per worker "
                                      "(1000 60-s 48 kHz FLACs from a remote shard would be 8 GB; a local "
                                      "shard's audio is held by reference)")
    timeout_s: float = Field(600, gt=0, description="with data.workers > 0: fail the run when the workers give no "
                             "batch for this long (a worker hung), instead of waiting for ever")
    missing_modality: Literal["mask", "drop"] = "mask"
    hard_negatives: Optional[HardNegatives] = None
    max_empty_shards: int = Field(16, ge=1, description="stop the run after this many shard reads in a row "
                                  "gave no sample (empty, unreadable or missing tars)")
    max_skips_in_a_row: int = Field(1000, ge=1, description="stop the run after this many samples in a row "
                                    "were skipped (every sample corrupt or lacking the configured modalities)")

    @model_validator(mode="after")
    def _modality_sections(self):
        extra = self.model_extra or {}
        for name, raw in list(extra.items()):
            if name not in MODALITIES:
                raise ValueError(f"unknown key 'data.{name}'; allowed: the keys of data and the modalities "
                                 f"{MODALITIES.names()}")
            if not isinstance(raw, BaseModel):
                extra[name] = validate_section(MODALITIES.section(name, "data"), raw or {}, f"data.{name}")
        return self

    def modality(self, name: str) -> Any:
        """The `data.<name>` section (its defaults when the config does not set it); its class is the modality's."""
        return (self.model_extra or {}).get(name) or MODALITIES.section(name, "data")()
