"""Images: PIL decode, open_clip's train/eval transforms."""
from __future__ import annotations

import io
from dataclasses import dataclass

import torch

from pipeline.modalities.base import Modality, ModalityData, Skip
from pipeline.registry import MODALITIES

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageData(ModalityData):
    extensions: list[str] = ["jpg", "jpeg", "png", "webp"]


@dataclass
class ImagePreprocess:
    """What an image tower expects."""

    image_size: int
    mean: tuple = OPENAI_MEAN
    std: tuple = OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"


class ImageTransform:
    dtype = torch.float32

    def __init__(self, image_size: int, mean, std, train: bool, interpolation: str = "bicubic",
                 resize_mode: str = "shortest"):
        from open_clip.transform import image_transform

        self.transform = image_transform(image_size, is_train=train, mean=tuple(mean), std=tuple(std),
                                         interpolation=interpolation, resize_mode=resize_mode)
        self.shape = (3, image_size, image_size)

    def __call__(self, image) -> torch.Tensor:
        return self.transform(image)


@MODALITIES.register("image", config=ImageData)
class Image(Modality):
    name = "image"

    def decode(self, data: bytes, cfg: ImageData):
        from PIL import Image as PILImage

        try:
            image = PILImage.open(io.BytesIO(data))
            image.load()
            return image.convert("RGB")
        except Exception as exc:  # PIL raises many types for damaged files
            raise Skip("corrupt_image") from exc

    def preprocessor(self, spec: ImagePreprocess, cfg, train: bool) -> ImageTransform:
        return ImageTransform(spec.image_size, spec.mean, spec.std, train, spec.interpolation, spec.resize_mode)
