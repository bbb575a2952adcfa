"""`pretrained`: load a tower's weights from whatever local file a researcher already has.

Accepted: a safetensors file, or a folder of them (a transformers `save_pretrained` folder), holding
- the tower itself (an mmclip checkpoint's `model.safetensors`, or a tower saved alone),
- an open_clip model (`visual.*` is the image tower, the text tower's keys sit at the top or under `text.`),
- a transformers CLIPModel (e.g. an `mmclip export --format hf` folder): its vision half loads into an
  open_clip_vision tower, its text half into an open_clip_text tower (pipeline.models.clip_keys),
- the library's own checkpoint of the backbone: a timm model (its classifier head is not used), a
  transformers model with or without its task prefix (`bert.*`, `model.encoder.*`, ...).
The file's prefix is found, not configured: it is the one under which every tensor of the tower (or
of its backbone) is present with a compatible shape. Only safetensors are read, never pickles.
A 3-channel stem loads into a 1-channel spectrogram CNN by summing channels (timm's own rule).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from pipeline.errors import UserError
from pipeline.models.clip_keys import hf_to_open_clip, is_hf_clip

# The library module inside each tower kind's encoder whose own checkpoints are accepted too.
BACKBONES = {"timm": "trunk", "hf_text": "transformer", "timm_audio": "backbone", "hf_audio": "backbone"}


def read_safetensors(path: str, key: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    p = Path(path)
    if not p.exists():
        raise UserError(f"{key}: {path} not found")
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
    if not files:
        raise UserError(f"{key}: {path} is a folder without .safetensors files (pickled .bin/.pt weights are "
                        f"not read; convert them with safetensors first)")
    state = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as exc:  # safetensors raises its own error types for malformed files
            raise UserError(f"{key}: {f} is not a readable safetensors file ({exc})") from None
    return state


def _fits(target: torch.Tensor, source: torch.Tensor) -> bool:
    same_but_channels = target.ndim == 4 and source.shape[:1] + source.shape[2:] == target.shape[:1] + target.shape[2:]
    return source.shape == target.shape or same_but_channels


def _prefixes(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> list[str]:
    """Every prefix under which `state` holds all of `own` with fitting shapes."""
    anchor = next(iter(own))
    candidates = {k[: len(k) - len(anchor)] for k in state
                  if k == anchor or k.endswith("." + anchor)}
    return sorted(p for p in candidates
                  if all(p + k in state and _fits(v, state[p + k]) for k, v in own.items()))


def _adapt(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    if source.shape == target.shape:
        return source
    from timm.models import adapt_input_conv

    return adapt_input_conv(target.shape[1], source)


def load_pretrained(tower, path: str, key: str) -> None:
    """Load `path` into the tower's encoder (or its backbone); a one-line error says what did not match."""
    state = read_safetensors(path, key)
    if tower.kind in ("open_clip_vision", "open_clip_text") and is_hf_clip(state):
        state = hf_to_open_clip(state)
    targets = [("the tower", tower.encoder)]
    if tower.kind in BACKBONES:
        targets.append((f"its {tower.kind} backbone", getattr(tower.encoder, BACKBONES[tower.kind])))
    for name, module in targets:
        own = module.state_dict()
        found = _prefixes(own, state)
        if len(found) > 1:
            raise UserError(f"{key}: {path} holds {name} under several prefixes {found}; save the one you want alone")
        if found:
            prefix = found[0]
            module.load_state_dict({k: _adapt(v, state[prefix + k]) for k, v in own.items()})
            _announce(f"{key}: loaded {len(own)} tensors into {name} from {path}"
                      + (f" (prefix {prefix!r})" if prefix else "")
                      + f"; {len(state) - len(own)} other tensors in the file are not part of it")
            return
    missing = [k for k in tower.encoder.state_dict() if k not in state][:3]
    raise UserError(f"{key}: {path} does not hold this {tower.kind} tower's weights (e.g. no {missing}); give the "
                    f"tower's own, an open_clip model's or the library's checkpoint of the same architecture")


def _announce(line: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(line, flush=True)
