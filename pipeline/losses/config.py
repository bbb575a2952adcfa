"""The keys every `loss:` section has; each registered loss subclasses it with its own (pipeline/losses/objectives)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from pipeline.section import Section


class LossSection(Section):
    """What every loss section has; each registered loss adds its own keys (pipeline/losses)."""

    kind: str
    chunk_size: Optional[int] = Field(None, gt=0, description="tile rows; null picks a default")
    compute_dtype: Literal["auto", "fp32"] = Field(
        "auto", description="tile GEMMs in the features' dtype (auto) or fp32; statistics stay fp32")
    distributed: Literal["auto", "gather", "ring"] = Field(
        "auto", description="columns across ranks: all-gathered, or passed around a ring (O(B_local·D) a rank); "
                            "auto rings from 3 ranks on")
