"""transformers export: a folder that `CLIPModel` (or `VisionTextDualEncoderModel`) and its processor load offline.

open_clip image + open_clip text towers -> CLIPModel; open_clip image + transformers text tower ->
VisionTextDualEncoderModel. Only towers those classes compute exactly are exported: every option they
cannot express is refused by name, so an export never loads and then gives different embeddings.
Audio towers go beside the model (`audio/`), said by the command.
"""
from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline.errors import UserError
from pipeline.export.model_card import write_model_card
from pipeline.export.open_clip import EXTRA, write_extra_tower
from pipeline.models.clip import MAX_LOG_SCALE
from pipeline.models.clip_keys import open_clip_to_hf

AUDIO = "audio"
BOS, EOS, PAD = "<|startoftext|>", "<|endoftext|>", "!"  # "!" is id 0, open_clip's padding id
# Options CLIPModel computes like open_clip does (patch dropout is off at eval; with token/EOT pooling a
# final LayerNorm before or after pooling is the same per-token op). Any other non-default option is refused.
EXPRESSIBLE = {
    "image": {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size", "patch_dropout",
              "output_tokens", "final_ln_after_pool"},
    "text": {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "output_tokens",
             "final_ln_after_pool", "pad_id", "eos_id"},
}
RESAMPLE = {"bicubic": 3, "bilinear": 2, "nearest": 0}  # PIL.Image.Resampling values


def _refuse(option: str, value, target: str) -> UserError:
    return UserError(f"--format hf: {option}={value!r} has no counterpart in transformers' {target}; "
                     f"export with --format open_clip or --format safetensors instead")


def _check_options(modality: str, tower, cfg_cls, target: str) -> None:
    defaults = {f.name: f.default for f in fields(cfg_cls)}
    for key, value in tower.export_cfg.items():
        if key not in EXPRESSIBLE[modality] and value != defaults.get(key) and value not in (None, {}):
            raise _refuse(f"model.towers.{modality}.options.{key}", value, target)


def _check_vision(tower, target: str) -> None:
    from open_clip.model import CLIPVisionCfg

    if tower.kind != "open_clip_vision":
        raise _refuse("model.towers.image.kind", tower.kind, target)
    _check_options("image", tower, CLIPVisionCfg, target)
    cfg = tower.export_cfg
    if not isinstance(cfg.get("layers", 12), int):
        raise _refuse("model.towers.image.options.layers", cfg["layers"], target)  # a tuple builds a ResNet
    size = cfg.get("image_size", 224)
    if not isinstance(size, int) and len(set(size)) > 1:
        raise _refuse("model.towers.image.options.image_size", size, target)
    if tower.preprocess.resize_mode == "longest":
        raise _refuse("model.towers.image.options.resize_mode", "longest", "CLIPImageProcessor")


def _check_text(tower, target: str) -> None:
    from open_clip.model import CLIPTextCfg

    _check_options("text", tower, CLIPTextCfg, target)
    cfg = tower.export_cfg
    if cfg.get("vocab_size", 49408) != 49408:  # the exported tokenizer is open_clip's 49408-token BPE
        raise _refuse("model.towers.text.options.vocab_size", cfg["vocab_size"], target)


def _vision_config(tower, embed_dim: int) -> dict:
    cfg = tower.export_cfg
    width, size = cfg.get("width", 768), cfg.get("image_size", 224)
    return {"hidden_size": width, "intermediate_size": int(width * cfg.get("mlp_ratio", 4.0)),
            "num_hidden_layers": cfg.get("layers", 12), "num_attention_heads": width // cfg.get("head_width", 64),
            "image_size": size if isinstance(size, int) else size[0], "patch_size": cfg.get("patch_size", 16),
            "num_channels": 3, "hidden_act": "gelu", "layer_norm_eps": 1e-5, "projection_dim": embed_dim}


def _text_config(tower, embed_dim: int) -> dict:
    cfg = tower.export_cfg
    width = cfg.get("width", 512)
    return {"vocab_size": 49408, "hidden_size": width, "intermediate_size": int(width * cfg.get("mlp_ratio", 4.0)),
            "num_hidden_layers": cfg.get("layers", 12), "num_attention_heads": cfg.get("heads", 8),
            "max_position_embeddings": cfg.get("context_length", 77), "hidden_act": "gelu", "layer_norm_eps": 1e-5,
            "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 0, "projection_dim": embed_dim}


def _image_processor(pre):
    """The eval transform's pixels at any input size (see pipeline.export.mmclip_image_processor). It is custom
    code in the export, so transformers loads it only with trust_remote_code=True and otherwise refuses, rather
    than falling back to a stock processor that crops elsewhere."""
    from pipeline.export.mmclip_image_processor import MmclipImageProcessor

    square = {"height": pre.image_size, "width": pre.image_size}
    size = square if pre.resize_mode == "squash" else {"shortest_edge": pre.image_size}
    return MmclipImageProcessor(size=size, crop_size=square, do_center_crop=pre.resize_mode != "squash",
                                resample=RESAMPLE[pre.interpolation], image_mean=list(pre.mean),
                                image_std=list(pre.std))


def write_clip_tokenizer(folder: Path, context_length: int):
    """open_clip's bundled BPE as vocab.json + merges.txt; ids padded with 0 and truncated to the context."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    bpe = SimpleTokenizer()
    special = {bpe.sot_token_id: BOS, bpe.eot_token_id: EOS}
    vocab = {special.get(i, token): i for token, i in bpe.encoder.items()}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.__getitem__)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), pad_token=PAD, model_max_length=context_length)
    tokenizer.save_pretrained(folder)
    return tokenizer


def _logit_scale(model) -> float:
    """The scale the pipeline scores with: training clamps it in forward, CLIPModel exponentiates it as stored."""
    return min(float(model.logit_scale.detach().item()), MAX_LOG_SCALE)


def _logit_config(model) -> dict:
    out = {"logit_scale_init_value": _logit_scale(model)}
    if model.logit_bias is not None:  # CLIPModel has no bias parameter: kept in the config for sigmoid scoring
        out["logit_bias"] = float(model.logit_bias.detach().item())
    return out


def _state(model, modality: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().float() for k, v in model.towers[modality].encoder.state_dict().items()}


def _clip_model(model, model_cfg):
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(text_config=_text_config(model.towers["text"], model_cfg.embed_dim),
                        vision_config=_vision_config(model.towers["image"], model_cfg.embed_dim),
                        projection_dim=model_cfg.embed_dim, **_logit_config(model))
    state = {**open_clip_to_hf("vision", _state(model, "image")), **open_clip_to_hf("text", _state(model, "text"))}
    return CLIPModel(config), state


def _dual_encoder(model, model_cfg):
    from transformers import CLIPVisionConfig, VisionTextDualEncoderConfig, VisionTextDualEncoderModel

    text = model.towers["text"]
    target = "VisionTextDualEncoderModel (text pooler output + bias-free linear projection)"
    options = text.export_cfg
    if options.get("hf_pooler_type") != "cls_pooler":
        raise _refuse("model.towers.text.options.hf_pooler_type", options.get("hf_pooler_type", "mean_pooler"), target)
    if options.get("hf_proj_type") != "linear":
        raise _refuse("model.towers.text.options.hf_proj_type", options.get("hf_proj_type", "mlp"), target)
    if getattr(text.encoder.transformer, "pooler", None) is None:
        raise _refuse("model.towers.text.name", text.export_cfg["hf_model_name"], target + ": it has no pooler")
    vision = CLIPVisionConfig(**_vision_config(model.towers["image"], model_cfg.embed_dim))
    config = VisionTextDualEncoderConfig.from_vision_text_configs(vision, text.encoder.config,
                                                                  projection_dim=model_cfg.embed_dim,
                                                                  **_logit_config(model))
    state = {**open_clip_to_hf("vision", _state(model, "image")),
             **{f"text_model.{k.removeprefix('transformer.')}": v for k, v in _state(model, "text").items()
                if k.startswith("transformer.")},
             "text_projection.weight": text.encoder.proj.weight.detach().float()}
    return VisionTextDualEncoderModel(config), state


def _write_audio(model, model_cfg, out: Path, final: Path, announce) -> None:
    tower = model.towers[AUDIO]
    if tower.kind != "hf_audio":
        write_extra_tower(model, model_cfg, AUDIO, out / EXTRA / AUDIO)
        announce(f"note: the {tower.kind} audio tower is not a transformers model; written to "
                 f"{final / EXTRA / AUDIO}/ (tower.safetensors + tower.yaml, as in the open_clip export)")
        return
    encoder, folder = tower.encoder, out / AUDIO
    encoder.backbone.save_pretrained(folder)
    save_file({"weight": encoder.proj.weight.detach().float().contiguous()}, str(folder / "projection.safetensors"))
    frontend, options = encoder.frontend, model_cfg.towers[AUDIO].options
    # AutoModel maps a whisper config to the encoder-decoder WhisperModel; the tower is its encoder alone
    cls = type(encoder.backbone)
    loader = "transformers.AutoModel" if cls.__name__.endswith("Model") else f"{cls.__module__}.{cls.__name__}"
    (folder / "frontend.json").write_text(json.dumps({
        "load": f"{loader}.from_pretrained(this folder)",
        "sample_rate": tower.preprocess.sample_rate, "n_fft": frontend.n_fft, "hop_length": frontend.hop_length,
        "n_mels": frontend.n_mels, "f_min": options.get("f_min", 50.0), "f_max": options.get("f_max"),
        "log_mel": "log(clamp(slaney mel filterbank @ |stft(hann, center=True)|^2, 1e-10)), frames padded/cut "
                   "to `frames`",
        "layout": {"frames": "[B, frames, n_mels]", "mels": "[B, n_mels, frames]"}[encoder.layout],
        "frames": encoder.frames,
        "pooling": "pooler_output if the model returns one, else last_hidden_state averaged over frames",
        "embedding": "pooled @ projection.weight.T"}, indent=2))
    announce(f"note: the transformers audio tower ({encoder.backbone.config.model_type}) is written to "
             f"{final / AUDIO}/ ({loader}.from_pretrained loads it; projection.safetensors and frontend.json beside it)")


def export_hf(model, model_cfg, out_dir: str | Path, source: str | Path | None = None, announce=print,
              final_dir: str | Path | None = None) -> Path:
    """Write the model, its processor and a model card into `out_dir`; `final_dir` is where it will be read
    from, if it is moved there after (what the command says)."""
    from transformers import CLIPProcessor, VisionTextDualEncoderProcessor

    towers = model.towers
    if "image" not in towers or "text" not in towers:
        raise UserError(f"--format hf needs an image and a text tower; this model has {sorted(towers)}; "
                        f"use --format safetensors")
    text = towers["text"]
    target = "VisionTextDualEncoderModel" if text.kind == "hf_text" else "CLIPModel"
    _check_vision(towers["image"], target)
    if text.kind != "hf_text":
        _check_text(text, target)
    try:
        hf_model, state = (_dual_encoder if text.kind == "hf_text" else _clip_model)(model, model_cfg)
    except KeyError as exc:  # a tensor of a block variant the option checks let through
        raise UserError(f"--format hf: {target} has no place for the tower tensor {exc.args[0]!r}; "
                        f"use --format open_clip") from None
    missing, unexpected = hf_model.load_state_dict({**state, "logit_scale": torch.tensor(_logit_scale(model))},
                                                   strict=False)
    if missing or unexpected:  # the option checks above should make this unreachable
        raise UserError(f"--format hf: {target} has no place for {unexpected[:3]} / lacks {missing[:3]}; "
                        f"use --format open_clip")
    out = Path(out_dir).resolve()
    final = Path(final_dir).resolve() if final_dir else out
    out.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(out)
    image_processor = _image_processor(towers["image"].preprocess)
    if text.kind == "hf_text":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(text.preprocess.hf_tokenizer,
                                                  model_max_length=text.preprocess.context_length)
        VisionTextDualEncoderProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    else:
        tokenizer = write_clip_tokenizer(out, text.preprocess.context_length)
        CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    announce(f"transformers {target}: {final}  ({target}.from_pretrained(DIR), "
             f"AutoProcessor.from_pretrained(DIR, trust_remote_code=True))")
    if model.logit_bias is not None:
        announce(f"note: trained with the sigmoid loss: CLIPModel has no logit bias, so it is written to "
                 f"config.json as logit_bias={model.logit_bias.item():.4f} (and README.md); "
                 f"pair probability = sigmoid(logit_scale.exp() * cos + logit_bias)")
    if AUDIO in towers:
        _write_audio(model, model_cfg, out, final, announce)
    write_model_card(out, final.name, model, model_cfg, target, _logit_scale(model), source)
    return out
