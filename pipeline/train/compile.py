"""`train.compile`: which forward functions of the training step torch.compile builds.

- `none`: eager.
- `model`: each tower's forward (its input normalisation and its encoder), one graph per tower.
- `step`: the whole model forward: the function GradCache's no-grad encode and its re-encode with grad call
  (through DeepSpeed's engine), one graph over every tower, the missing-modality embeddings and the logit
  scale. The loss stays outside: its tiles compile their fused kernels already (pipeline.losses.tiles.kernels),
  and its collectives and custom autograd functions would only break the graph.

Compiled forwards run in training mode only. Evaluation encodes batches of other sizes (the last partial
batch, a task's number of class prompts), each of which would be a compile that does not pay. Each function
compiles once per input shape, dtype and grad mode (pipeline.compiled), so GradCache with micro-batches builds
a no-grad and a grad graph. Weights, state-dict keys and checkpoints are those of the eager model: the module
keeps its parameters, only its `forward` is replaced. ZeRO-3 is refused (pipeline.config): it gathers the
weights in hooks inside the forward, and dynamo cannot trace its partitioned parameters.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from pipeline.compiled import Compiled

if TYPE_CHECKING:
    from pipeline.models.clip import MultiModalCLIP


def compile_forward(module: nn.Module, backend="inductor") -> None:
    """Replace `module.forward` by its compiled self in training mode (the eager one in eval mode)."""
    eager = module.forward
    compiled = Compiled(eager, backend)

    def forward(*args, **kwargs):
        return compiled(*args, **kwargs) if module.training else eager(*args, **kwargs)

    module.forward = forward


RECOMPILE_LIMIT = 64


def compile_model(model: MultiModalCLIP, mode: str, backend="inductor") -> None:
    """Apply `train.compile` to the model; `backend` is torch.compile's (aot_eager in the unit tests).

    Dynamo keeps at most `recompile_limit` (8) compiled variants of one function's code and runs the rest
    eagerly, and every tower shares Tower.forward's: towers x grad modes x shapes (GradCache's last partial
    chunk, hard negatives) pass 8 with two towers already, so the limit is raised for this process."""
    if mode != "none":
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    if mode == "model":
        for tower in model.towers.values():
            compile_forward(tower, backend)
    elif mode == "step":
        compile_forward(model, backend)
