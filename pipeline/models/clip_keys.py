"""open_clip <-> transformers CLIP weight names: one table read both ways (export and `pretrained` import).

open_clip's ViT and text transformer hold attention as one fused `in_proj` (q, k, v stacked) and the
projections as `[width, embed]` matrices; transformers' CLIPModel keeps separate q/k/v linears and
`nn.Linear` projections (`[embed, width]`). Everything else is a rename.
"""
from __future__ import annotations

import re

import torch

BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
         "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
# tower -> (transformers sub-model, open_clip name -> its name there, open_clip projection, transformers projection)
TOWERS = {
    "vision": ("vision_model", {"class_embedding": "embeddings.class_embedding",
                                "positional_embedding": "embeddings.position_embedding.weight",
                                "conv1.weight": "embeddings.patch_embedding.weight",
                                "ln_pre": "pre_layrnorm", "ln_post": "post_layernorm"},
               "proj", "visual_projection.weight"),
    "text": ("text_model", {"token_embedding.weight": "embeddings.token_embedding.weight",
                            "positional_embedding": "embeddings.position_embedding.weight",
                            "ln_final": "final_layer_norm"},
             "text_projection", "text_projection.weight"),
}
# Where open_clip's CLIP state dict keeps each tower (what `pretrained` already reads).
OPEN_CLIP_PREFIX = {"vision": "visual.", "text": ""}
LAYER = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
HF_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)")


def _rename(key: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old):]
    raise KeyError(key)


def open_clip_to_hf(tower: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One open_clip tower's own state dict (VisionTransformer / TextTransformer keys) -> CLIPModel keys.

    Raises KeyError on a tensor CLIPModel has no place for (the export checks options before this)."""
    model, names, proj, hf_proj = TOWERS[tower]
    out = {}
    for key, value in state.items():
        layer = LAYER.fullmatch(key)
        if key == proj:
            out[hf_proj] = value.T
        elif layer and layer.group(2).startswith("attn.in_proj_"):
            base, kind = f"{model}.encoder.layers.{layer.group(1)}.self_attn", layer.group(2).rsplit("_", 1)[1]
            for name, part in zip("qkv", value.chunk(3)):
                out[f"{base}.{name}_proj.{kind}"] = part
        elif layer:
            out[f"{model}.encoder.layers.{layer.group(1)}.{_rename(layer.group(2), BLOCK)}"] = value
        else:
            out[f"{model}.{_rename(key, names)}"] = value
    return {k: v.contiguous() for k, v in out.items()}


def hf_to_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIPModel (or dual encoder's CLIP vision) state dict -> open_clip CLIP keys (`visual.*`, text at the top).

    Tensors of other architectures are left out; whether what remains fits a tower is `pretrained`'s check."""
    out = {}
    for tower, (model, names, proj, hf_proj) in TOWERS.items():
        prefix, inverse, inverse_block = OPEN_CLIP_PREFIX[tower], {v: k for k, v in names.items()}, \
            {v: k for k, v in BLOCK.items()}
        if hf_proj in state:
            out[prefix + proj] = state[hf_proj].T
        for key, value in state.items():
            if not key.startswith(model + "."):
                continue
            rest = key[len(model) + 1:]
            layer = HF_LAYER.fullmatch(rest)
            if layer and re.fullmatch(r"self_attn\.[qkv]_proj\.(weight|bias)", layer.group(2)):
                if layer.group(2).startswith("self_attn.q_proj"):  # k and v join q's fused tensor
                    kind = layer.group(2).rsplit(".", 1)[1]
                    parts = [state[f"{model}.encoder.layers.{layer.group(1)}.self_attn.{n}_proj.{kind}"] for n in "qkv"]
                    out[f"{prefix}transformer.resblocks.{layer.group(1)}.attn.in_proj_{kind}"] = torch.cat(parts)
            else:
                try:
                    out[prefix + (f"transformer.resblocks.{layer.group(1)}.{_rename(layer.group(2), inverse_block)}"
                                  if layer else _rename(rest, inverse))] = value
                except KeyError:  # not a CLIP tower (e.g. a dual encoder's BERT text model): left out
                    continue
    return {k: v.contiguous() for k, v in out.items()}


def is_hf_clip(state: dict) -> bool:
    return any(k.startswith(("vision_model.embeddings.", "text_model.embeddings.")) for k in state)
