"""Any model a user has, as the model eval scores: a baseline and a run go through the same code.

Accepted `--checkpoint` values:
- a run directory, checkpoint directory or `--format safetensors` export (mmclip's own);
- an open_clip `local-dir:` export (`local-dir:DIR`, or DIR holding open_clip_config.json);
- `open_clip:ARCH@WEIGHTS.safetensors`: an open_clip architecture (a built-in name, or the path of an
  open_clip model-config JSON) with local weights;
- a transformers folder: CLIPModel, VisionTextDualEncoderModel, SiglipModel (anything with
  `get_image_features` / `get_text_features`) with its tokenizer and image processor config.
External models are wrapped as a MultiModalCLIP whose towers call the library's own encoders and
describe their preprocessing like mmclip towers do, so eval needs nothing else.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import UserError
from pipeline.modalities.image import ImagePreprocess
from pipeline.modalities.text import TextPreprocess
from pipeline.models.clip import MultiModalCLIP
from pipeline.models.towers import Tower

OPEN_CLIP = "open_clip:"
LOCAL_DIR = "local-dir:"
INTERPOLATION = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL resample ids in image processor configs


class LibraryEncoder(nn.Module):
    """One modality of a library model: input tensor -> un-normalised embedding."""

    def __init__(self, model: nn.Module, encode, pad_id: int | None = None):
        super().__init__()
        self.model, self.encode, self.pad_id = model, encode, pad_id

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(self.model, x) if self.pad_id is None else self.encode(self.model, x, x != self.pad_id)


def _wrap(model, image_encode, text_encode, image_pre, text_pre, embed_dim: int, pad_id: int | None = None) -> MultiModalCLIP:
    """The library model's logit scale and, for sigmoid models (SigLIP), its bias come along: forward() then gives
    the scale and bias its pair logits use (the scale clamped at 100, as for mmclip's own models)."""
    towers = {"image": Tower("external", LibraryEncoder(model, image_encode), image_pre),
              "text": Tower("external", LibraryEncoder(model, text_encode, pad_id), text_pre)}
    bias = getattr(model, "logit_bias", None)
    return MultiModalCLIP(towers, embed_dim, _scalar(model.logit_scale), None if bias is None else _scalar(bias)).eval()


def _scalar(parameter: torch.Tensor) -> float:
    return float(parameter.detach().reshape(-1)[0])


# ----------------------------------------------------------------------------------------- open_clip
def _open_clip_model(oc, text_cfg: dict) -> MultiModalCLIP:
    from open_clip.model import get_model_preprocess_cfg

    if text_cfg.get("tokenizer_kwargs"):
        raise UserError(f"open_clip text_cfg.tokenizer_kwargs={text_cfg['tokenizer_kwargs']} is not supported by "
                        f"mmclip eval's tokenizer (open_clip's default BPE cleaning or a local transformers tokenizer)")
    pre = get_model_preprocess_cfg(oc)
    size = pre["size"] if isinstance(pre["size"], int) else pre["size"][0]
    image_pre = ImagePreprocess(size, tuple(pre["mean"]), tuple(pre["std"]), pre.get("interpolation", "bicubic"),
                                pre.get("resize_mode", "shortest"))
    text_pre = TextPreprocess(text_cfg.get("context_length", 77), text_cfg.get("hf_tokenizer_name"))
    with torch.no_grad():
        embed_dim = oc.encode_text(torch.zeros(1, text_pre.context_length, dtype=torch.long)).shape[-1]
    return _wrap(oc, lambda m, x: m.encode_image(x), lambda m, x: m.encode_text(x), image_pre, text_pre, embed_dim)


def load_open_clip_dir(folder: Path) -> MultiModalCLIP:
    import open_clip

    if not (folder / "open_clip_config.json").is_file():
        raise UserError(f"{LOCAL_DIR}{folder}: no open_clip_config.json there")
    if not (folder / "open_clip_model.safetensors").is_file():  # open_clip would fall back to a pickled .bin
        raise UserError(f"{LOCAL_DIR}{folder}: no open_clip_model.safetensors there (pickled weights are not read)")
    oc = open_clip.create_model(f"{LOCAL_DIR}{folder}", load_weights=True)
    text_cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]
    return _open_clip_model(oc.eval(), text_cfg)


def load_open_clip_arch(spec: str) -> MultiModalCLIP:
    """`open_clip:ARCH@WEIGHTS.safetensors`, ARCH a built-in name or an open_clip model-config JSON file."""
    import open_clip
    from safetensors.torch import load_file

    arch, sep, weights = spec.removeprefix(OPEN_CLIP).partition("@")
    if not sep or not weights.endswith(".safetensors"):
        raise UserError(f"{spec}: expected {OPEN_CLIP}ARCH@/path/weights.safetensors (only safetensors weights are "
                        f"read, never pickles)")
    if arch.endswith(".json"):
        if not Path(arch).is_file():
            raise UserError(f"{spec}: model config {arch} not found")
        open_clip.add_model_config(arch)
        arch = Path(arch).stem
    model_config = open_clip.get_model_config(arch)
    if model_config is None:
        raise UserError(f"{spec}: {arch!r} is not an open_clip architecture (open_clip.list_models()) nor a "
                        f"model-config JSON file")
    if not Path(weights).is_file():
        raise UserError(f"{spec}: weights file {weights} not found")
    oc = open_clip.create_model(arch, pretrained=None)
    missing, unexpected = oc.load_state_dict(load_file(weights), strict=False)
    if missing or unexpected:
        raise UserError(f"{spec}: {weights} does not fit {arch}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return _open_clip_model(oc.eval(), model_config["text_cfg"])


# -------------------------------------------------------------------------------------- transformers
def _hf_image_processor(folder: Path):
    """An mmclip export's processor is custom code in the folder: its settings are read with this package's own
    class, never by running the folder's copy."""
    from transformers import AutoImageProcessor

    from pipeline.export.mmclip_image_processor import MmclipImageProcessor

    config, _ = MmclipImageProcessor.get_image_processor_dict(str(folder))
    if config.get("image_processor_type") == MmclipImageProcessor.__name__:
        return MmclipImageProcessor.from_pretrained(str(folder))
    return AutoImageProcessor.from_pretrained(str(folder), backend="pil")


def _hf_image_preprocess(folder: Path) -> ImagePreprocess:
    proc = _hf_image_processor(folder)
    size = proc.size.get("shortest_edge") or proc.size.get("height")
    if size is None:
        raise UserError(f"{folder}: its image processor's size {proc.size} has neither shortest_edge nor height")
    crop = getattr(proc, "do_center_crop", False)  # SigLIP processors squash to the size, no crop
    if crop and proc.crop_size.get("height") != size:
        raise UserError(f"{folder}: resize to {size} then crop to {proc.crop_size} is not an open_clip eval transform")
    return ImagePreprocess(size, tuple(proc.image_mean), tuple(proc.image_std),
                           INTERPOLATION.get(int(proc.resample), "bicubic"),
                           "shortest" if crop else "squash")


def load_transformers_dir(folder: Path) -> MultiModalCLIP:
    from transformers import AutoModel, AutoTokenizer

    try:
        model = AutoModel.from_pretrained(str(folder), use_safetensors=True).eval()  # never a pickle
    except (OSError, ValueError, KeyError) as exc:  # transformers' own errors for unreadable folders
        raise UserError(f"{folder}: transformers cannot load this folder ({str(exc).splitlines()[0]})") from None
    if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
        raise UserError(f"{folder}: {type(model).__name__} is not an image-text dual encoder (CLIPModel, "
                        f"VisionTextDualEncoderModel, SiglipModel ...)")
    tokenizer, config = AutoTokenizer.from_pretrained(str(folder)), model.config
    # a tokenizer saved without a length reports transformers' "very large" placeholder
    context = tokenizer.model_max_length if tokenizer.model_max_length < 10**6 else \
        config.text_config.max_position_embeddings
    embed_dim = getattr(config, "projection_dim", None) or config.text_config.hidden_size
    # CLIP and SigLIP text towers were trained without a padding mask (causal / last token); BERT-like ones need it
    pad_id = tokenizer.pad_token_id if config.model_type == "vision-text-dual-encoder" else None
    return _wrap(model, lambda m, x: m.get_image_features(pixel_values=x).pooler_output,
                 lambda m, x, mask=None: m.get_text_features(input_ids=x, attention_mask=mask).pooler_output,
                 _hf_image_preprocess(folder), TextPreprocess(context, str(folder)), embed_dim, pad_id)


# --------------------------------------------------------------------------------------------- entry
def load_eval_model(spec: str) -> MultiModalCLIP:
    """The model named by `--checkpoint`, whatever produced it (see the module docstring)."""
    if spec.startswith(OPEN_CLIP):
        return load_open_clip_arch(spec)
    if spec.startswith(LOCAL_DIR):
        return load_open_clip_dir(Path(spec.removeprefix(LOCAL_DIR)))
    folder = Path(spec)
    if (folder / "open_clip_config.json").is_file():
        return load_open_clip_dir(folder)
    if (folder / "config.json").is_file() and not (folder / "model_config.yaml").is_file():
        return load_transformers_dir(folder)
    from pipeline.models.io import load_model

    return load_model(spec)[0]
