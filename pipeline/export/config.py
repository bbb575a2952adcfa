"""The `export:` section: the format and folder a finished run is exported to."""
from __future__ import annotations

from typing import Literal, Optional

from pipeline.section import Section


class ExportConfig(Section):
    format: Literal["open_clip", "hf", "safetensors"] = "open_clip"
    dir: Optional[str] = None
