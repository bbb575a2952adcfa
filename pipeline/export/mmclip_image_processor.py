"""The image processor of a `--format hf` export; the export ships a copy of this file (it imports transformers only).

The model was evaluated with open_clip's transform: PIL resize, then torchvision's CenterCrop, whose offset is
round((side - crop) / 2), half to even. transformers' CLIP processors floor that offset, so whenever the resized
side exceeds the crop by 3 (mod 4) pixels they crop one pixel over (about one aspect ratio in four). This is
transformers' PIL-backend CLIP processor with torchvision's offset: the eval pixels at any input size.
"""
from transformers import CLIPImageProcessorPil


class MmclipImageProcessor(CLIPImageProcessorPil):
    def center_crop(self, image, size, **kwargs):
        """Crop a [C, H, W] array where torchvision's CenterCrop does; images smaller than the crop are padded
        as transformers does (never the case after the shortest-edge resize)."""
        height, width = image.shape[-2:]
        if height < size.height or width < size.width:
            return super().center_crop(image, size, **kwargs)
        top, left = round((height - size.height) / 2), round((width - size.width) / 2)
        return image[..., top:top + size.height, left:left + size.width]


# save_pretrained then copies this file into the export and names it in the config's auto_map
MmclipImageProcessor.register_for_auto_class("AutoImageProcessor")
