"""The two records that travel through a training step, typed in one place.

`Batch` is what the loader yields and the model reads; `Features` is what the model returns and the
loss (pipeline.losses.base) reads. Both are plain dicts at run time — GradCache slices and concatenates
them key by key — so per-modality entries use the modality's name as key (`batch["image"]`,
`features["text_neg"]`), and these TypedDicts list the fixed keys and document the variable ones.
"""
from __future__ import annotations

from typing import TypedDict

import torch
from typing_extensions import Required  # typing.Required is 3.11+


class Batch(TypedDict, total=False):
    """One rank's batch. Besides these keys, for every configured modality M:
    `batch[M]`: the preprocessed inputs, [n, *shape] (zeros where the sample lacks M, see `mask`);
    `batch[f"{M}_neg"]`: [n, K, *shape] hard negatives of modality M (data.hard_negatives)."""

    mask: dict[str, torch.Tensor]  # modality -> bool [n]: the sample has it (else the model's "missing" embedding)
    label: torch.Tensor            # long [n], -1 when the sample has no `.cls`
    index: torch.Tensor            # long [n]: global sample index (shard order + per-shard counts), -1 if unknown
    key: list[str]                 # the samples' WebDataset keys
    skipped: dict[str, int]        # samples skipped by reason since the worker's previous batch


class Features(TypedDict, total=False):
    """The model's output for a batch. Besides these keys, for every modality M:
    `features[M]`: L2-normalised embeddings [n, D]; `features[f"{M}_neg"]`: [n, K, D]."""

    logit_scale: Required[torch.Tensor]  # exp(learned log-scale), a scalar; always there
    logit_bias: torch.Tensor   # a scalar, present when the model has a bias (sigmoid loss)


SCALARS: tuple[str, ...] = ("logit_scale", "logit_bias")  # Features entries that are not per-sample rows


def modalities_of(features: Features) -> list[str]:
    """The modality embeddings in `features` (not negatives, not scalars), sorted."""
    return sorted(k for k in features if not k.endswith("_neg") and k not in SCALARS)
