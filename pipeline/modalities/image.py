"""Images: lazy PIL decode; training crops stay uint8 (normalised per batch by the tower), eval is open_clip's.

Training path (what costs CPU time on real photos): `decode` reads only the header; the train
preprocessor asks the JPEG decoder for a reduced DCT scale (`Image.draft`, 1/2, 1/4 or 1/8) when the
source is at least twice the crop, so a 640-px photo for a 224-px crop decodes a quarter of the pixels;
then open_clip's train crop (RandomResizedCrop, scale (0.9, 1.0), bicubic) and PILToTensor: uint8, no
float copy per sample. A batch is stacked channel-last, as PIL holds the pixels (`stack_channels_last`),
and handed on as a [B, 3, S, S] view. The image tower turns uint8 batches into normalised floats once, on its device
(`normalize_uint8`, used by pipeline.models.towers.Tower). Eval keeps open_clip's float transform at
full decode, so exported models score exactly as open_clip / CLIP_benchmark would.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Callable, cast

import torch

from pipeline.modalities.base import Modality, ModalityData, Skip
from pipeline.registry import MODALITIES

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
TRAIN_CROP_SCALE = (0.9, 1.0)  # open_clip's AugmentationCfg default


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


def normalize_uint8(images: torch.Tensor, mean, std, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> (x / 255 - mean) / std in `dtype`; the arithmetic of ToTensor + Normalize,
    in float32 whatever `dtype` is, so bf16 training sees the same rounding as a float batch cast to bf16."""
    shape = (3, 1, 1)
    mean = torch.tensor(mean, dtype=torch.float32, device=images.device).view(shape)
    std = torch.tensor(std, dtype=torch.float32, device=images.device).view(shape)
    return images.float().div_(255).sub_(mean).div_(std).to(dtype)  # in place: one float batch, not four


def load_rgb(image, draft_size: int | None = None):
    """Decode a lazily opened PIL image (at a reduced JPEG scale when the source is >= 2x `draft_size`) as RGB.

    Decoding happens here, not in `Image.decode`, so a file whose header parses but whose data is damaged
    fails here: it is skipped as corrupt_image like one with a damaged header."""
    try:
        if draft_size is not None and min(image.size) >= 2 * draft_size:
            image.draft("RGB", (draft_size, draft_size))  # JPEG only; other formats ignore it
        image.load()
        return image if image.mode == "RGB" else image.convert("RGB")
    except Exception as exc:  # PIL raises many types for damaged files
        raise Skip("corrupt_image") from exc


def stack_channels_last(crops: list[torch.Tensor]) -> torch.Tensor:
    """[B, 3, S, S] from [3, S, S] crops whose memory is channel-last (PILToTensor's views of PIL's pixels):
    stacking them as [S, S, 3] is a plain copy, stacking the CHW views an unvectorised strided one (for
    224-px uint8 crops ~1 ms each, a fifth of the loader's time). The result is a channels_last view."""
    return torch.stack([c.permute(1, 2, 0) for c in crops]).permute(0, 3, 1, 2)


class ImageTransform:
    """Train: draft decode -> random resized crop -> uint8 [3, S, S]; eval: open_clip's float transform.
    `collate` stacks a batch of its outputs."""

    def __init__(self, image_size: int, mean, std, train: bool, interpolation: str = "bicubic",
                 resize_mode: str = "shortest"):
        self.image_size, self.train = image_size, train
        self.shape = (3, image_size, image_size)
        self.transform: Callable[[Any], torch.Tensor]
        if train:
            from torchvision import transforms as T

            self.dtype, self.collate = torch.uint8, stack_channels_last
            self.transform = T.Compose([
                T.RandomResizedCrop(image_size, scale=TRAIN_CROP_SCALE, interpolation=T.InterpolationMode.BICUBIC),
                T.PILToTensor()])
        else:
            from open_clip.transform import image_transform

            self.dtype, self.collate = torch.float32, torch.stack
            # one Compose when not training (open_clip's inferred return type also has the training tuple)
            self.transform = cast(Callable[[Any], torch.Tensor], image_transform(
                image_size, is_train=False, mean=tuple(mean), std=tuple(std), interpolation=interpolation,
                resize_mode=resize_mode))

    def __call__(self, image) -> torch.Tensor:
        return self.transform(load_rgb(image, self.image_size if self.train else None))


@MODALITIES.register("image", config=ImageData)
class Image(Modality):
    name = "image"

    def decode(self, data: bytes, cfg: ImageData):
        """The opened image, header read and pixels not yet decoded (see the module docstring)."""
        from PIL import Image as PILImage

        try:
            return PILImage.open(io.BytesIO(data))
        except Exception as exc:  # PIL raises many types for damaged files
            raise Skip("corrupt_image") from exc

    def preprocessor(self, spec: ImagePreprocess, cfg, train: bool) -> ImageTransform:
        return ImageTransform(spec.image_size, spec.mean, spec.std, train, spec.interpolation, spec.resize_mode)
