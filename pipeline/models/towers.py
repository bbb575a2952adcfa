"""Towers: a config names a tower kind, the registry (pipeline.registry.TOWERS) builds it.

Image and open_clip text towers are open_clip's own modules, built from its public classes as
open_clip.create_model builds them, so that exporting to open_clip is a key rename, not a
re-implementation. Every tower maps its input to `[B, embed_dim]` (un-normalised) and records how
its input must be preprocessed.
"""
from __future__ import annotations

import inspect
from dataclasses import asdict, fields
from functools import partial
from typing import TYPE_CHECKING, Optional, cast

import torch
from torch import nn

from pipeline.errors import UserError
from pipeline.modalities.audio import AudioPreprocess
from pipeline.modalities.image import ImagePreprocess, normalize_uint8
from pipeline.modalities.text import TextPreprocess
from pipeline.models.config import TowerConfig
from pipeline.registry import TOWERS

if TYPE_CHECKING:
    from pipeline.models.audio_features import LogMel

PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")


class Tower(nn.Module):
    """An encoder plus the description of the input it expects (read by data and export)."""

    def __init__(self, kind: str, encoder: nn.Module, preprocess, export_cfg: dict | None = None):
        super().__init__()
        self.kind = kind
        self.encoder = encoder
        self.preprocess = preprocess
        # open_clip vision_cfg / text_cfg; None if open_clip cannot express the tower (audio). An hf_text
        # cfg names a local path, which the export replaces with a copy inside the export folder.
        self.export_cfg = export_cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images may come as uint8 (training batches, see pipeline.modalities.image): normalised here, once per
        batch, on the tower's device. Audio may come as K crops per sample, [B, K, T]: the sample's embedding
        is the mean of its crops' embeddings."""
        if x.dtype == torch.uint8 and isinstance(self.preprocess, ImagePreprocess):
            dtype = next(self.encoder.parameters()).dtype
            x = normalize_uint8(x, self.preprocess.mean, self.preprocess.std, dtype)
        if isinstance(self.preprocess, AudioPreprocess) and x.dim() == 3:
            b, k = x.shape[:2]
            return self.encoder(x.flatten(0, 1)).view(b, k, -1).mean(1)
        return self.encoder(x)


def _same_named(cls, cfg) -> dict:
    """The cfg fields `cls` takes under the same name: with the arguments below, what open_clip's factory passes
    (its builder is private, so it may change without notice)."""
    params = inspect.signature(cls).parameters
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name in params}


def _act_norm(cfg) -> dict:
    """GELU and open_clip's LayerNorm (what its factory uses for fp32 models), with the config's kwargs for them."""
    from open_clip.transformer import LayerNorm

    return {"act_layer": nn.GELU if cfg.act_kwargs is None else partial(nn.GELU, **cfg.act_kwargs),
            "norm_layer": partial(LayerNorm, **cfg.norm_kwargs) if cfg.norm_kwargs else LayerNorm}


def _vision_encoder(cfg, embed_dim: int) -> nn.Module:
    """A timm trunk, a ModifiedResNet (`layers` a tuple) or a VisionTransformer, as open_clip.create_model builds."""
    if cfg.timm_model_name:
        from open_clip.timm_model import TimmModel

        return TimmModel(cfg.timm_model_name, embed_dim, image_size=cfg.image_size, pool=cfg.timm_pool,
                         proj=cfg.timm_proj, proj_bias=cfg.timm_proj_bias, drop=cfg.timm_drop,
                         drop_path=cfg.timm_drop_path, patch_drop=cfg.patch_dropout if cfg.patch_dropout > 0 else None,
                         pretrained=cfg.timm_model_pretrained)
    if isinstance(cfg.layers, (tuple, list)):
        from open_clip.modified_resnet import ModifiedResNet

        return ModifiedResNet(list(cfg.layers), embed_dim, heads=cfg.width * 32 // cfg.head_width,
                              image_size=cfg.image_size, width=cfg.width)
    from open_clip.transformer import VisionTransformer

    return VisionTransformer(**_same_named(VisionTransformer, cfg), heads=cfg.width // cfg.head_width,
                             output_dim=embed_dim, **_act_norm(cfg))


def _text_encoder(cfg, embed_dim: int) -> nn.Module:
    """A transformers model with open_clip's pooling and projection, or open_clip's TextTransformer."""
    if cfg.hf_model_name:
        from open_clip.hf_model import HFTextEncoder

        return HFTextEncoder(cfg.hf_model_name, embed_dim, pooler_type=cfg.hf_pooler_type, proj_type=cfg.hf_proj_type,
                             pretrained=cfg.hf_model_pretrained, output_tokens=cfg.output_tokens)
    from open_clip.transformer import TextTransformer

    return TextTransformer(**_same_named(TextTransformer, cfg), output_dim=embed_dim, **_act_norm(cfg))


def _split_preprocess(options: dict) -> tuple[dict, dict]:
    model_opts = {k: v for k, v in options.items() if k not in PREPROCESS_KEYS}
    return model_opts, {k: tuple(v) if isinstance(v, list) else v for k, v in options.items() if k in PREPROCESS_KEYS}


@TOWERS.register("timm", modality="image")
@TOWERS.register("open_clip_vision", modality="image")
def _open_clip_vision(cfg: TowerConfig, embed_dim: int) -> Tower:
    from open_clip.model import CLIPVisionCfg

    opts, pre = _split_preprocess(cfg.options)
    if cfg.kind == "timm":
        if not cfg.name:
            raise UserError("model.towers.image.name: a timm tower needs a timm model name, e.g. vit_tiny_patch16_224")
        opts = {"timm_model_name": cfg.name, **opts}
    vision_cfg = _dataclass_from(CLIPVisionCfg, opts, f"model.towers.image.options ({cfg.kind})")
    encoder = _vision_encoder(vision_cfg, embed_dim)
    size = vision_cfg.image_size if isinstance(vision_cfg.image_size, int) else vision_cfg.image_size[0]
    return Tower(cfg.kind, encoder, ImagePreprocess(image_size=size, **pre), _set_fields(vision_cfg))


@TOWERS.register("open_clip_text", modality="text")
@TOWERS.register("hf_text", modality="text")
def _open_clip_text(cfg: TowerConfig, embed_dim: int) -> Tower:
    from open_clip.model import CLIPTextCfg

    opts = dict(cfg.options)
    if cfg.kind == "hf_text":
        if not cfg.name:
            raise UserError("model.towers.text.name: an hf_text tower needs a local transformers model path")
        opts = {"hf_model_name": cfg.name, "hf_tokenizer_name": cfg.name, "hf_model_pretrained": False, **opts}
    text_cfg = _dataclass_from(CLIPTextCfg, opts, f"model.towers.text.options ({cfg.kind})")
    encoder = _text_encoder(text_cfg, embed_dim)
    return Tower(cfg.kind, encoder, TextPreprocess(text_cfg.context_length, text_cfg.hf_tokenizer_name),
                 _set_fields(text_cfg))


class MelEncoder(nn.Module):
    """Waveform -> log-mel -> backbone -> projection; the front end lives in the model so it runs on the GPU."""

    def __init__(self, frontend: nn.Module, backbone: nn.Module, width: int, embed_dim: int, layout: str,
                 frames: Optional[int] = None):
        super().__init__()
        self.frontend = frontend
        self.backbone = backbone
        self.proj = nn.Linear(width, embed_dim, bias=False)
        self.layout = layout  # "image": [B,1,mels,frames] for CNN/ViT; "frames": [B,frames,mels]; "mels": [B,mels,frames]
        self.frames = frames  # transformer encoders with fixed positions need exactly this many frames

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        mel = self.frontend(waveform)  # [B, mels, frames]
        if self.frames is not None and mel.shape[-1] != self.frames:
            mel = nn.functional.pad(mel, (0, self.frames - mel.shape[-1])) if mel.shape[-1] < self.frames \
                else mel[..., : self.frames]
        if self.layout == "image":
            pooled = self.backbone(mel.unsqueeze(1))
        else:
            x = mel.transpose(1, 2) if self.layout == "frames" else mel
            out = self.backbone(x)
            pooled = out.pooler_output if getattr(out, "pooler_output", None) is not None else out.last_hidden_state.mean(1)
        return self.proj(pooled)


def _frontend(opts: dict) -> tuple[LogMel, int]:
    from pipeline.models.audio_features import LogMel

    sample_rate = int(opts.pop("sample_rate", 16000))
    mel_keys = ("n_fft", "hop_length", "n_mels", "f_min", "f_max")
    return LogMel(sample_rate=sample_rate, **{k: opts.pop(k) for k in mel_keys if k in opts}), sample_rate


@TOWERS.register("timm_audio", modality="audio")
def _timm_audio(cfg: TowerConfig, embed_dim: int) -> Tower:
    import timm

    opts = dict(cfg.options)
    frontend, sample_rate = _frontend(opts)
    if not cfg.name:
        raise UserError("model.towers.audio.name: a timm_audio tower needs a timm model name, e.g. resnet18")
    try:
        backbone = timm.create_model(cfg.name, pretrained=False, in_chans=1, num_classes=0, **opts)
    except (RuntimeError, TypeError) as exc:
        raise UserError(f"model.towers.audio: timm cannot build {cfg.name!r} with {opts}: {exc}") from None
    width = cast(int, backbone.num_features)  # timm models set it; create_model is typed as returning nn.Module
    encoder = MelEncoder(frontend, backbone, width, embed_dim, layout="image")
    return Tower(cfg.kind, encoder, AudioPreprocess(sample_rate))


@TOWERS.register("hf_audio", modality="audio")
def _hf_audio(cfg: TowerConfig, embed_dim: int) -> Tower:
    """AST or a Whisper encoder built from a transformers config (random init), fed by our log-mel."""
    from transformers import AutoConfig, AutoModel

    opts = dict(cfg.options)
    frontend, sample_rate = _frontend(opts)
    model_type = opts.pop("model_type", cfg.name)
    try:
        hf_cfg = AutoConfig.for_model(model_type, **opts)
    except (ValueError, KeyError) as exc:
        raise UserError(f"model.towers.audio: transformers has no audio config {model_type!r} ({exc})") from None
    if hf_cfg.model_type == "whisper":
        from transformers import WhisperConfig
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        assert isinstance(hf_cfg, WhisperConfig)
        hf_cfg.num_mel_bins = frontend.n_mels  # the encoder's first conv reads our mel bins
        backbone, layout = WhisperEncoder(hf_cfg), "mels"
    else:
        backbone, layout = AutoModel.from_config(hf_cfg), "frames"
    width = hf_cfg.hidden_size if hasattr(hf_cfg, "hidden_size") else hf_cfg.d_model
    encoder = MelEncoder(frontend, backbone, width, embed_dim, layout, frames=_expected_frames(hf_cfg))
    return Tower(cfg.kind, encoder, AudioPreprocess(sample_rate))


def _expected_frames(hf_cfg) -> Optional[int]:
    if hf_cfg.model_type == "whisper":
        return 2 * hf_cfg.max_source_positions
    return getattr(hf_cfg, "max_length", None)


def _set_fields(cfg) -> dict:
    """An open_clip tower config as a dict without unset (None) fields: open_clip reads absent as default."""
    return {k: v for k, v in asdict(cfg).items() if v is not None}


def _dataclass_from(cls, opts: dict, where: str):
    allowed = set(cls.__dataclass_fields__)
    unknown = sorted(set(opts) - allowed)
    if unknown:
        raise UserError(f"{where}: unknown option(s) {unknown}; allowed: {sorted(allowed)}")
    return cls(**opts)


def build_tower(modality: str, cfg: TowerConfig, embed_dim: int) -> Tower:
    """Build the tower named by `cfg.kind` and load `cfg.pretrained` (see pipeline.models.pretrained) if given."""
    entry = TOWERS.get(cfg.kind, f"model.towers.{modality}.kind")
    if entry.info["modality"] != modality:
        raise UserError(f"model.towers.{modality}.kind: {cfg.kind!r} is a {entry.info['modality']} tower, not {modality}")
    tower = entry.obj(cfg, embed_dim)
    if cfg.pretrained:
        from pipeline.models.pretrained import load_pretrained

        load_pretrained(tower, cfg.pretrained, f"model.towers.{modality}.pretrained")
    return tower
