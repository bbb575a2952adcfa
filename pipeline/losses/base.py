"""The loss contract, and the base classes every registered loss builds on.

A loss is an `nn.Module` registered with `@LOSSES.register(kind, config=ItsConfig)`; the trainer builds
it from the config's `loss:` section (`ItsConfig`, a subclass of `pipeline.losses.config.LossSection`) and
calls it once per step on the features of the whole local batch. What every loss must keep:

Inputs: `forward(features, step)`. `features` (pipeline.batch.Features) holds, per modality, this
rank's rows as L2-normalised `[n, D]` embeddings; `"<modality>_neg"`: `[n, K, D]` hard negatives of
that modality for the other modalities' anchors; `"logit_scale"` (already exponentiated) and
`"logit_bias"` (when the model has one). `step` is the same on every rank: seed any per-step
randomness from it (`self.seed` and `step`), so all ranks draw the same and a resumed run draws
what it would have. `index` ([n] long) holds the rows' global sample indices (shard order and
per-shard counts; -1 where the counts are unknown), for losses that keep per-sample state.

Needs: a loss declares what it needs from the rest of the pipeline in `requires` (a class attribute):
"sample_index" (the trainer then refuses data without per-shard counts in one line and passes the
dataset's sample count as `num_samples=`), "logit_bias" (the config must set model.init_logit_bias).
Optimizer groups it wants for the model's parameters (e.g. its own learning rate for the logit scale)
come from `param_groups(model)`; training reads these two, never a loss's own config keys.

Output: a scalar, the GLOBAL loss over every rank's rows, identical on every rank (fp32 for bf16/fp16
features: statistics are kept in fp32; feature gradients come back in the features' dtype). Its autograd
gradient is only THIS rank's SHARE of the global gradient: summed over ranks, the shares equal the
single-process gradient (the scale and bias counted once). The trainer therefore multiplies by the
world size (DeepSpeed averages gradients over ranks). Use `distributed.gather_with_grad` for columns
and `distributed.global_sum` for the value; a loss ported from open_clip (which averages a local
loss over ranks) would otherwise train silently wrong — the conformance suite
(tests/unit/test_loss_contract.py) checks 1 vs 2 vs 3 ranks for every registered loss.

State: a loss may keep persistent state (e.g. per-sample statistics). `state_dict()` is saved per rank
in every checkpoint (`rank{R}_state.pt`); on resume `load_states()` receives every saved rank's dict,
so state keyed by global sample index can be resharded into another number of ranks. Parameters the
loss learns itself (`extra_parameters()`) get their gradients through GradCache like the model's.
Updates to it are made final in `step_end(finite)`, which the trainer calls on every rank after each
step: a step whose loss was NaN/inf on any rank (skipped, not applied) gets `finite=False`.
"""
from __future__ import annotations

from itertools import combinations

import torch
import torch.distributed as dist
from torch import nn

from pipeline.batch import Features, modalities_of
from pipeline.losses.config import LossSection


class ContrastiveLoss(nn.Module):
    requires: frozenset[str] = frozenset()  # "sample_index", "logit_bias": see the module docstring

    def __init__(self, cfg: LossSection, group=None, seed: int = 0):
        super().__init__()
        self.cfg, self.group, self.seed = cfg, group, seed
        # what every functional loss takes from the common keys: tile size, precision, how columns cross
        # ranks, and the ranks (pipeline.losses.tiles.TileSpec.resolve); pass them all with **self.options
        self.options = {"chunk_size": cfg.chunk_size, "compute_dtype": cfg.compute_dtype,
                        "distributed": cfg.distributed, "group": group}

    def forward(self, features: Features, step: int = 0, index: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def step_end(self, finite: bool) -> None:
        """Make this step's state updates final (finite) or drop them; stateless losses have none."""

    def param_groups(self, model: nn.Module) -> list[dict]:
        """Optimizer groups (torch's dicts: "params" plus options such as "lr") for model parameters this loss
        wants treated apart; the engine puts every other parameter in its decay / no-decay groups."""
        return []

    def extra_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters the loss itself learns and steps (e.g. per-sample temperatures), outside the model."""
        return []

    def exported_logit_scale(self) -> float | None:
        """The log scale a saved model should carry when the loss does not use the model's own (e.g. one τ
        per sample); None keeps the model's. Called on every rank (it may be a collective)."""
        return None

    def load_states(self, states: list[dict]) -> None:
        """Restore from every saved rank's `state_dict()`, in rank order (a loss keyed by sample index can
        reshard them into another number of ranks). Stateless losses ignore them."""
        if any(states):
            rank = dist.get_rank(self.group) if self.group is not None else 0
            self.load_state_dict(states[rank])


class PairwiseLoss(ContrastiveLoss):
    """A two-modality loss averaged over every pair of modalities. Hard negatives `<m>_neg` are extra
    candidates for the anchors of the pair's other modality; with `mined_negatives` in the config, each
    step adds mined and mixed ones (objectives.mined_negatives), drawn from a generator seeded by (seed, step)."""

    def __init__(self, cfg: LossSection, group=None, seed: int = 0):
        super().__init__(cfg, group, seed)
        options = getattr(cfg, "mined_negatives", None)
        self.miner = None
        if options is not None:
            from pipeline.losses.objectives.mined_negatives import MinedNegatives

            self.miner = MinedNegatives(**options.model_dump(), chunk_size=cfg.chunk_size, group=group,
                                        distributed=cfg.distributed)

    def pair_loss(self, a: torch.Tensor, b: torch.Tensor, negatives, features: Features) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, features: Features, step: int = 0, index: torch.Tensor | None = None) -> torch.Tensor:
        losses = []
        for pair, (x, y) in enumerate(combinations(modalities_of(features), 2)):
            if f"{x}_neg" in features and f"{y}_neg" not in features:
                x, y = y, x  # negatives are candidates for the other modality's anchors
            negatives = features.get(f"{y}_neg")
            if self.miner is not None:
                generator = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 31 + pair)
                mined = self.miner(features[x], features[y], step, generator)
                if mined is not None:
                    negatives = mined if negatives is None else torch.cat([negatives, mined], 1)
            losses.append(self.pair_loss(features[x], features[y], negatives, features))
        return torch.stack(losses).mean()
