"""The loss contract over gloo ranks: for every registered loss (docs/extending.md's example included), 2 and 3
ranks each return the global loss, and their gradient shares sum to the single-process gradient."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers.loss_contract import REFERENCES, B, build, call, features, loss_and_grads, modalities_for
from helpers.ranks import free_port


def _rank(rank, world, port, kind, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = slice(rank * B // world, (rank + 1) * B // world)
    local = {k: v[rows] if v.ndim else v for k, v in features(modalities_for(kind)).items()}
    loss = build(kind, group=dist.group.WORLD)
    value, grads = loss_and_grads(lambda x: call(loss, x, rows), local)
    torch.save({"loss": value, "grads": grads}, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("kind", sorted(REFERENCES))
def test_ranks_return_the_global_loss_and_their_share_of_the_gradient(kind, world, tmp_path):
    mp.spawn(_rank, args=(world, free_port(), kind, str(tmp_path)), nprocs=world)
    loss = build(kind)
    want, want_g = loss_and_grads(lambda x: call(loss, x), features(modalities_for(kind)))
    results = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(world)]
    for r, res in enumerate(results):
        torch.testing.assert_close(res["loss"], want, rtol=1e-10, atol=1e-12)
        rows = slice(r * B // world, (r + 1) * B // world)
        for k, v in want_g.items():
            if v is not None and v.ndim:
                torch.testing.assert_close(res["grads"][k], v[rows], rtol=1e-9, atol=1e-12, msg=k)
    for k, v in want_g.items():
        if v is not None and not v.ndim:  # scalars: the shares sum to the single-process gradient
            torch.testing.assert_close(sum(res["grads"][k] for res in results), v, rtol=1e-9, atol=1e-12, msg=k)
