"""The built-in objectives; importing this registers them (pipeline.registry.LOSSES loads it on first lookup)."""
from pipeline.losses.objectives import clip, global_clip, siglip, symile  # noqa: F401
