"""torch.compile where inductor can build, eager where it cannot: one warning per process, the same results.

Inductor needs a C++ compiler on a CPU node and triton beside CUDA; a node without them must still train.
The first failure turns every `Compiled` function of the process eager (the fused loss tiles and the compiled
forwards alike), so a run warns once, not at every function or step. Shapes are static (`dynamic=False`): a
function compiles once per input shape and dtype, which a training run keeps fixed.
"""
from __future__ import annotations

import functools
import sys
from typing import Callable, ClassVar


class Compiled:
    """`fn`, run through `torch.compile(fn, dynamic=False)` until inductor has failed once in this process."""

    broken: ClassVar[str | None] = None  # why inductor failed in this process, once it has

    def __init__(self, fn: Callable, backend="inductor"):
        import torch

        self.fn, self.compiled = fn, torch.compile(fn, dynamic=False, backend=backend)
        functools.update_wrapper(self, fn)

    def __call__(self, *args, **kwargs):
        if Compiled.broken is None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as err:  # inductor fails in many ways where it cannot build; eager always works
                Compiled.broken = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"
                print(f"mmclip: warning: torch.compile is off, it failed here ({Compiled.broken}); the fused loss "
                      "tiles and compiled forwards (train.compile) run eagerly, with the same results, more slowly",
                      file=sys.stderr, flush=True)
        return self.fn(*args, **kwargs)
