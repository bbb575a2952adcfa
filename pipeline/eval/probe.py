"""Compositional probe score, SugarCrepe/ARO style: does an image's true caption beat its one-edit negative?

Reads the probe.jsonl the study set writes (pipeline/data/study.py): per item an image path, `pos`,
`neg` and the `edit` type. The metric is the fraction of items whose true caption has the higher
cosine similarity (ties count as misses, so a model blind to the edit scores 0, not 0.5 on a tie).
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.errors import UserError

Encoders = tuple[Callable[[list[Image.Image]], torch.Tensor], Callable[[list[str]], torch.Tensor]]


def read_probe(probe_dir: str | Path) -> list[dict]:
    path = Path(probe_dir) / "probe.jsonl"
    if not path.is_file():
        raise UserError(f"{path} does not exist: build the study set with `mmclip data study --out DIR` and pass "
                        f"DIR/probe")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@torch.no_grad()
def probe_accuracy(model, probe_dir: str | Path, batch_size: int = 256) -> dict[str, float | int]:
    """`model`: an mmclip MultiModalCLIP (any checkpoint or export, pipeline.eval.models.load_eval_model) or a
    pair (encode_images, encode_texts) of functions from PIL images / strings to embeddings."""
    items, root = read_probe(probe_dir), Path(probe_dir)
    encode_images, encode_texts = model if isinstance(model, tuple) else model_encoders(model)
    images = _embed(sorted({it["image"] for it in items}),
                    lambda paths: encode_images([Image.open(root / p).convert("RGB") for p in paths]), batch_size)
    texts = _embed(sorted({t for it in items for t in (it["pos"], it["neg"])}), encode_texts, batch_size)
    wins = defaultdict(list)
    for it in items:
        image = images[it["image"]]
        won = bool(image @ texts[it["pos"]] > image @ texts[it["neg"]])
        wins["all"].append(won)
        wins[it["edit"]].append(won)
    out: dict[str, float | int] = {"probe_acc": sum(wins.pop("all")) / len(items), "probe_items": len(items)}
    out.update({f"probe_acc_{edit}": sum(w) / len(w) for edit, w in sorted(wins.items())})
    return out


def model_encoders(model) -> Encoders:
    """A MultiModalCLIP's image and text encoders behind its own eval preprocessing."""
    from pipeline.modalities.preprocess import preprocessors

    preprocess = preprocessors(model.inputs(), None, train=False)
    device = next(model.parameters()).device
    return (lambda ims: model.encode("image", torch.stack([preprocess["image"](im) for im in ims]).to(device)),
            lambda texts: model.encode("text", preprocess["text"](texts).to(device)))


def _embed(keys: Sequence[str], encode: Callable, batch_size: int) -> dict[str, torch.Tensor]:
    feats = torch.cat([encode(list(keys[i:i + batch_size])).float().cpu() for i in range(0, len(keys), batch_size)])
    return dict(zip(keys, F.normalize(feats, dim=-1), strict=True))
