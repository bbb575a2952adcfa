"""global_clip over 2 gloo ranks equals one process (gathered or ringed columns), and its saved state reshards."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers.global_clip_ref import N, compare, naive_steps, reloaded, run_steps, save
from helpers.ranks import free_port


def worker(rank, world, port, individual, out_dir, mode):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = slice(rank * N // world, (rank + 1) * N // world)
    out, gcl = run_steps(individual, rows, dist.group.WORLD, mode)
    save(gcl, os.path.join(out_dir, "world2"), rank)
    resharded = reloaded(os.path.join(out_dir, "world1"), individual, dist.group.WORLD)
    out["resharded"] = {"u": resharded.log_u.values, "indices": resharded.log_u.shard_indices()}
    torch.save(out, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["gather", "ring"])
@pytest.mark.parametrize("individual", [False, True])
def test_two_ranks_equal_one_and_state_reshards(individual, mode, tmp_path):
    world = 2
    _, single = run_steps(individual, slice(None), None)
    for sub in ("world1", "world2"):
        (tmp_path / sub).mkdir()
    save(single, tmp_path / "world1")
    mp.spawn(worker, args=(world, free_port(), individual, str(tmp_path), mode), nprocs=world)
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(world)]
    want = naive_steps(individual)
    for r, got in enumerate(ranks):
        compare(got, want, slice(r * N // world, (r + 1) * N // world), individual)
        torch.testing.assert_close(got["resharded"]["u"], single.log_u.values[got["resharded"]["indices"]],
                                   equal_nan=True)
    key = "tau" if individual else "scale"  # each rank's share; summed over ranks = the whole gradient
    torch.testing.assert_close(sum(got[1][key] for got in ranks), want[1][key], rtol=1e-10, atol=1e-12)
    merged = reloaded(tmp_path / "world2", individual)  # two ranks' files into one
    torch.testing.assert_close(merged.log_u.values, want["u"], rtol=1e-12, atol=1e-12, equal_nan=True)
    if individual:
        torch.testing.assert_close(merged.tau.values, single.tau.values)
