"""Zero-shot metrics with CLIP_benchmark's definitions and names."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

SIMPLE_TEMPLATES = ["a photo of a {c}.", "a blurry photo of a {c}.", "a black and white photo of a {c}.",
                    "a low contrast photo of a {c}.", "a high contrast photo of a {c}.", "a bad photo of a {c}.",
                    "a good photo of a {c}."]


def openai_templates() -> list[str]:
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [t("{c}") for t in OPENAI_IMAGENET_TEMPLATES]


@torch.no_grad()
def class_embeddings(encode_text: Callable, tokenize: Callable, classnames: list[str], templates: list[str],
                     device) -> torch.Tensor:
    """[C, D]: per class, every template filled, encoded, normalised, averaged, normalised again."""
    rows = []
    for name in classnames:
        tokens = tokenize([t.replace("{c}", name) for t in templates]).to(device)
        rows.append(F.normalize(F.normalize(encode_text(tokens).float(), dim=-1).mean(0), dim=0))
    return torch.stack(rows)


def classification_metrics(features: torch.Tensor, classifier: torch.Tensor, labels: torch.Tensor) -> dict:
    from sklearn.metrics import balanced_accuracy_score  # CLIP_benchmark's metric; a second to import, so here

    logits = 100.0 * features @ classifier.T
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return {"acc1": hits[:, 0].float().mean().item(), "acc5": hits.any(1).float().mean().item(),
            "mean_per_class_recall": float(balanced_accuracy_score(labels.numpy(), top[:, 0].numpy()))}


def retrieval_metrics(item_features: torch.Tensor, text_features: torch.Tensor, text_owner: torch.Tensor,
                      ks=(1, 5, 10)) -> dict:
    """image_retrieval_recall@k: text -> item; text_retrieval_recall@k: item -> any of its texts."""
    scores = text_features @ item_features.T  # [texts, items]
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(text_owner)), text_owner] = True
    out = {}
    for k in ks:
        top_items = scores.topk(min(k, scores.shape[1]), dim=1).indices
        out[f"image_retrieval_recall@{k}"] = positive.gather(1, top_items).any(1).float().mean().item()
        top_texts = scores.T.topk(min(k, scores.shape[0]), dim=1).indices
        out[f"text_retrieval_recall@{k}"] = positive.T.gather(1, top_texts).any(1).float().mean().item()
    return out
