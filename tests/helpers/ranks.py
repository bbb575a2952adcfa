"""Gloo ranks on this machine: a free port, and the tiled losses over W ranks against one process."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pipeline.losses import clip_loss, siglip_loss, symile_loss

B, D, K = 12, 6, 2


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
