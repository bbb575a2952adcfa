"""Modalities: everything the pipeline knows about one kind of input, one file each.

A modality file defines its `data.<name>` config section, how a sample's members decode into a value,
the train/eval preprocessing that turns it into a fixed-shape tensor (the placeholder for a sample
that lacks it is zeros of that shape), and the description a tower gives of the input it expects.
It registers with `@MODALITIES.register(name, config=Section)`. Imports nothing from models, losses
or training; the data path and the towers both build on it.
"""
from pipeline.modalities import audio, image, text  # noqa: F401  (registers the built-in modalities)
from pipeline.modalities.base import Modality, Preprocessor

__all__ = ["Modality", "Preprocessor"]
