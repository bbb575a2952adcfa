"""Models: one encoder ("tower") per modality and the multimodal CLIP that holds them.

Towers are built from the config's `model.towers` by kind through a registry (pipeline.registry) (timm,
open_clip, transformers), always with random init unless a local `pretrained` file is given.
Knows nothing about data loading, losses or the training engine.
"""
from pipeline.models.clip import MultiModalCLIP, build_model
from pipeline.models.towers import build_tower

__all__ = ["MultiModalCLIP", "build_model", "build_tower"]
