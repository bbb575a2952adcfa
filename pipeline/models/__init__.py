"""Models: one encoder ("tower") per modality and the multimodal CLIP that holds them.

Towers are built from the config's `model.towers` by kind through a registry (pipeline.registry) (timm,
open_clip, transformers), always with random init unless a local `pretrained` file is given.
Knows nothing about data loading, losses or the training engine.
"""
from typing import TYPE_CHECKING

from pipeline.lazy import lazy_exports

if TYPE_CHECKING:  # for readers and type checkers; at run time the names load on first use
    from pipeline.models.clip import MultiModalCLIP, build_model
    from pipeline.models.towers import build_tower

__getattr__ = lazy_exports(__name__, {"MultiModalCLIP": "pipeline.models.clip", "build_model": "pipeline.models.clip",
                                      "build_tower": "pipeline.models.towers"})

__all__ = ["MultiModalCLIP", "build_model", "build_tower"]
