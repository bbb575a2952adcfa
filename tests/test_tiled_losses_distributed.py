"""With a process group, each rank's loss is the global loss and its gradients are its share:
feature gradients equal the matching slices of the single-process gradients, and the scale/bias
gradients summed over ranks equal the single-process ones (counted once). All-gather on 2 and 3
gloo ranks, the ring on 2, 3 and 4 with odd blocks; on 2 ranks the bf16 path too, against float64 of
the same bf16 values (the tolerances of test_tiled_losses_bf16)."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pipeline.losses import clip_loss, siglip_loss, symile_loss

pytestmark = pytest.mark.slow  # starts training processes

B, D, K = 12, 6, 2


def inputs(dtype=torch.float64, b=B):
    """float64 inputs, or bf16 ones (fp32 scale and bias) whose values are exactly representable."""
    g = torch.Generator().manual_seed(0)
    unit = lambda *s: F.normalize(torch.randn(*s, generator=g, dtype=torch.float64), dim=-1).to(dtype)
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    return {"f": [unit(b, D) for _ in range(3)], "negs": unit(b, K, D),
            "scale": torch.tensor(5.0, dtype=stat), "bias": torch.tensor(-2.0, dtype=stat)}


def as_float64(x):
    return {k: [t.double() for t in v] if isinstance(v, list) else v.double() for k, v in x.items()}


def run_case(case, feats, negs, scale, bias, group, mode="gather"):
    kw = {"chunk_size": 5, "group": group, "distributed": mode}
    if case == "clip":
        return clip_loss(feats[0], feats[1], scale, hard_negatives=negs, hard_negative_alpha=0.5,
                         hard_negative_beta=0.3, **kw)
    if case == "siglip":
        return siglip_loss(feats[0], feats[1], scale, bias, hard_negatives=negs, **kw)
    if case == "symile_n":
        return symile_loss(feats, scale, negatives="n", generator=torch.Generator().manual_seed(1), **kw)
    return symile_loss(feats, scale, negatives="n_squared", **kw)


def leaves(x):
    return {"f": [t.clone().requires_grad_() for t in x["f"]], "negs": x["negs"].clone().requires_grad_(),
            "scale": x["scale"].clone().requires_grad_(), "bias": x["bias"].clone().requires_grad_()}


def grads(case, x, group, mode="gather"):
    loss = run_case(case, x["f"], x["negs"], x["scale"], x["bias"], group, mode)
    loss.backward()
    return loss.detach(), {"f": [t.grad for t in x["f"]], "negs": x["negs"].grad, "scale": x["scale"].grad,
                           "bias": x["bias"].grad}


def worker(rank, world, port, case, out_dir, dtype=torch.float64, mode="gather", b=B):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    full = inputs(dtype, b)
    rows = slice(rank * b // world, (rank + 1) * b // world)
    local = leaves({"f": [t[rows] for t in full["f"]], "negs": full["negs"][rows], "scale": full["scale"],
                    "bias": full["bias"]})
    loss, g = grads(case, local, dist.group.WORLD, mode)
    torch.save({"loss": loss, "g": g}, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_equals_one_process(case, world, tmp_path, mode, b):
    mp.spawn(worker, args=(world, free_port(), case, str(tmp_path), torch.float64, mode, b), nprocs=world)
    ref_loss, ref = grads(case, leaves(inputs(b=b)), None)
    results = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(world)]
    for r, res in enumerate(results):
        rows = slice(r * b // world, (r + 1) * b // world)
        torch.testing.assert_close(res["loss"], ref_loss, rtol=1e-10, atol=1e-12)
        for got, want in zip(res["g"]["f"], ref["f"]):
            if want is not None:
                torch.testing.assert_close(got, want[rows], rtol=1e-10, atol=1e-12)
        if ref["negs"] is not None:
            torch.testing.assert_close(res["g"]["negs"], ref["negs"][rows], rtol=1e-10, atol=1e-12)
    for key in ("scale", "bias"):
        if ref[key] is not None:
            torch.testing.assert_close(sum(res["g"][key] for res in results), ref[key], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("case", ["clip", "siglip", "symile_n", "symile_n_squared"])
def test_distributed_loss_equals_global_loss(case, world, tmp_path):
    assert_equals_one_process(case, world, tmp_path, "gather", B)


# 7, 5, 3 and 11 rows a rank; tiles (and ring parts) of 5
@pytest.mark.parametrize("world,b", [(2, 14), (3, 15), (4, 12), (3, 33)])
@pytest.mark.parametrize("case", ["clip", "siglip", "symile_n"])
def test_ring_equals_global_loss(case, world, b, tmp_path):
    assert_equals_one_process(case, world, tmp_path, "ring", b)


@pytest.mark.parametrize("case,mode", [(c, "gather") for c in ("clip", "siglip", "symile_n", "symile_n_squared")]
                         + [(c, "ring") for c in ("clip", "siglip", "symile_n")])
def test_distributed_bf16_loss_is_close_to_float64(case, mode, tmp_path):
    world = 2
    mp.spawn(worker, args=(world, free_port(), case, str(tmp_path), torch.bfloat16, mode), nprocs=world)
    ref_loss, ref = grads(case, leaves(as_float64(inputs(torch.bfloat16))), None)
    results = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(world)]

    def joined(key, m=None):  # every rank's rows of one gradient, back in global order
        return torch.cat([(res["g"][key] if m is None else res["g"][key][m]).double() for res in results])

    cosine = lambda got, want: F.cosine_similarity(got.flatten(), want.flatten(), 0).item()
    for res in results:
        assert abs(res["loss"].double() - ref_loss).item() <= 3e-3 * abs(ref_loss).item()
    for m, want in enumerate(ref["f"]):
        if want is not None:
            assert results[0]["g"]["f"][m].dtype == torch.bfloat16 and cosine(joined("f", m), want) >= 0.9999
    if ref["negs"] is not None:
        assert cosine(joined("negs"), ref["negs"]) >= 0.9999
    for key in ("scale", "bias"):
        if ref[key] is not None:
            got = sum(res["g"][key].double() for res in results)
            assert abs(got - ref[key]).item() <= 1e-2 * abs(ref[key]).item()
