"""Mined negatives over 2 and 3 gloo ranks: the global batch's top-k, the same mixtures and losses as one process."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers.mined_ref import S2, K, N, S, draws, features, leaves, mined_losses, naive_losses, naive_negatives
from helpers.ranks import free_port
from pipeline.losses.objectives.mined_negatives import MinedNegatives
from pipeline.losses.tiles import TileSpec, top_k_negatives


def worker(rank, world, port, out_dir, ring):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = slice(rank * N // world, (rank + 1) * N // world)
    a, b = (f[rows] for f in features(3))
    spec = TileSpec.resolve(a.device, 5, distributed="ring" if ring else "gather", group=dist.group.WORLD)
    _, top = top_k_negatives(a, b if ring else features(3)[1], K, spec)
    negs = MinedNegatives(top_k=K, mixed=S, mix_with_anchor=S2, chunk_size=5, group=dist.group.WORLD,
                          distributed="ring" if ring else "gather")(a, b, step=4,
                                                                    generator=torch.Generator().manual_seed(4))
    x = leaves(a, b)
    out = {}
    for kind, loss in mined_losses(*x, negs, dist.group.WORLD).items():
        grads = torch.autograd.grad(loss, x[:3])
        out[kind] = {"loss": loss.detach(), "grads": grads}
    torch.save({"top": top, "negs": negs, "losses": out}, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world,ring", [(2, False), (3, True)])  # the losses ring too from 3 ranks on ("auto")
def test_ranks_mine_the_global_batch(world, ring, tmp_path):
    mp.spawn(worker, args=(world, free_port(), str(tmp_path), ring), nprocs=world)
    a, b = features(3)
    top, negs = naive_negatives(a, b, draws(4))
    y = leaves(a, b)
    refs = naive_losses(*y, negs)
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(world)]
    for r, got in enumerate(ranks):
        rows = slice(r * N // world, (r + 1) * N // world)
        assert torch.equal(got["top"], top[rows])  # global column indices
        torch.testing.assert_close(got["negs"], negs[rows], rtol=1e-12, atol=1e-14)
        for kind, ref in refs.items():
            torch.testing.assert_close(got["losses"][kind]["loss"], ref.detach(), rtol=1e-10, atol=1e-12)
            want = torch.autograd.grad(ref, y[:3], retain_graph=True)
            for g, w in zip(got["losses"][kind]["grads"][:2], want[:2]):
                torch.testing.assert_close(g, w[rows], rtol=1e-9, atol=1e-12)
    for kind, ref in refs.items():  # the scale: each rank's share, summed = the whole gradient
        scale_grad, = torch.autograd.grad(ref, [y[2]], retain_graph=True)
        torch.testing.assert_close(sum(got["losses"][kind]["grads"][2] for got in ranks), scale_grad, rtol=1e-9,
                                   atol=1e-12)
