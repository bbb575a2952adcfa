"""The global contrastive loss equals a naive float64 full-matrix version of the same update rule
(value, gradients, u updates), alone and with its sharded state over 2 gloo ranks; state round trips."""
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_tiled_losses_distributed import free_port

from pipeline.errors import UserError
from pipeline.losses.objectives.global_clip import GlobalClipLoss, gamma_at, global_clip_loss

N, D, M = 12, 6, 30  # global batch, feature dim, dataset size
GAMMA, RHO = 0.3, 0.5


def unit(*shape, seed, dtype=torch.float64):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype), dim=-1)


def naive(a, b, s_img, s_txt, u_img, u_txt, gamma, rho):
    """Objective value, surrogate (its gradient is the estimator) and new u, on the whole B×B matrix."""
    z = a @ b.T
    off = ~torch.eye(z.shape[0], dtype=torch.bool)
    value, surrogate, new_u = 0.0, 0.0, []
    for logits, scale, u in ((s_img[:, None] * z, s_img, u_img), (s_txt[:, None] * z.T, s_txt, u_txt)):
        g = (torch.exp(logits - torch.diagonal(logits)[:, None]) * off).sum(1) / (z.shape[0] - 1)
        u = torch.where(torch.isnan(u), g, (1 - gamma) * u + gamma * g).detach()
        tau = 1 / scale
        value = value + 0.5 * (tau * (torch.log(g) + rho)).mean()
        surrogate = surrogate + 0.5 * (tau.detach() * g / u + tau * (torch.log(u) + rho)).mean()
        new_u.append(u)
    return value, surrogate, new_u


def expand(s, n=N):
    return s.expand(n) if s.dim() == 0 else s


@pytest.mark.parametrize("gamma", [GAMMA, 1.0])
@pytest.mark.parametrize("individual", [False, True])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_loss_gradients_and_u_equal_naive_reference(gamma, individual, chunk):
    a, b = unit(N, D, seed=1).requires_grad_(), unit(N, D, seed=2).requires_grad_()
    g = torch.Generator().manual_seed(3)
    if individual:
        s_img = (5 + 20 * torch.rand(N, generator=g, dtype=torch.float64)).requires_grad_()
        s_txt = (5 + 20 * torch.rand(N, generator=g, dtype=torch.float64)).requires_grad_()
    else:
        s_img = s_txt = torch.tensor(12.0, dtype=torch.float64, requires_grad=True)
    u_img, u_txt = torch.rand(N, generator=g, dtype=torch.float64), torch.rand(N, generator=g, dtype=torch.float64)
    u_img[::3] = float("nan")  # never seen: starts at its batch estimate
    out = global_clip_loss(a, b, s_img, s_txt, u_img.log(), u_txt.log(), gamma=gamma, rho=RHO, chunk_size=chunk)
    value, surrogate, new_u = naive(a, b, expand(s_img), expand(s_txt), u_img, u_txt, gamma, RHO)
    leaves = [a, b, s_img] + ([s_txt] if individual else [])
    torch.testing.assert_close(out.loss, value, rtol=1e-12, atol=1e-12)
    for got, want in zip(torch.autograd.grad(out.loss, leaves), torch.autograd.grad(surrogate, leaves)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.log_u_image, new_u[0].log(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.log_u_text, new_u[1].log(), rtol=1e-12, atol=1e-12)


def test_gamma_one_is_the_exact_gradient_of_the_batch_objective():
    a, b = unit(N, D, seed=4).requires_grad_(), unit(N, D, seed=5).requires_grad_()
    s = torch.tensor(9.0, dtype=torch.float64, requires_grad=True)
    old = torch.rand(N, dtype=torch.float64).log()  # ignored at γ = 1
    out = global_clip_loss(a, b, s, s, old, old, gamma=1.0, rho=RHO, chunk_size=5)
    value, _, _ = naive(a, b, s.expand(N), s.expand(N), old, old, 1.0, RHO)
    for got, want in zip(torch.autograd.grad(out.loss, [a, b, s]), torch.autograd.grad(value, [a, b, s])):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_temperatures_do_not_overflow_and_low_precision_accumulates_in_fp32(dtype):
    a64, b64 = unit(40, 16, seed=6), unit(40, 16, seed=7)
    a, b = a64.to(dtype).requires_grad_(), b64.to(dtype).requires_grad_()
    s = torch.tensor(300.0)  # τ = 1/300: exp(logits) overflows fp32 outside log space
    nan = torch.full((40,), float("nan"))
    out = global_clip_loss(a, b, s, s, nan, nan, gamma=GAMMA, rho=RHO, chunk_size=7)
    out.loss.backward()
    ref, _, new_u = naive(a.detach().double(), b.detach().double(), s.double().expand(40), s.double().expand(40),
                          nan.double(), nan.double(), GAMMA, RHO)
    assert out.loss.dtype == torch.float32 and a.grad.dtype == dtype and torch.isfinite(a.grad).all()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert abs(out.loss.double().item() - ref.item()) <= tol * abs(ref.item())
    torch.testing.assert_close(out.log_u_image.double(), new_u[0].log(), rtol=tol, atol=tol)


def test_gamma_schedule():
    assert gamma_at(0, 0.2, "constant", 100) == 0.2
    assert gamma_at(0, 0.2, "cosine", 100) == 1.0
    assert gamma_at(50, 0.2, "cosine", 100) == pytest.approx(0.6)
    assert gamma_at(100, 0.2, "cosine", 100) == gamma_at(500, 0.2, "cosine", 100) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="gamma_schedule"):
        GlobalClipLoss(M, gamma_schedule="linear")
    with pytest.raises(ValueError, match="gamma_decay_steps"):
        GlobalClipLoss(M, gamma_schedule="cosine")


def batches():
    """Two steps' global batches: features and (non-contiguous, overlapping) dataset indices."""
    perm = torch.randperm(M, generator=torch.Generator().manual_seed(8))
    return [(unit(N, D, seed=10 + t), unit(N, D, seed=20 + t), perm[t * 8: t * 8 + N]) for t in range(2)]


def run_steps(individual: bool, rows: slice, group, distributed: str = "gather") -> dict:
    """Two steps of GlobalClipLoss on this rank's rows; the first step is committed, the second both
    computed and committed; also an uncommitted third call, which must leave the tables alone."""
    gcl = GlobalClipLoss(M, gamma=GAMMA, rho=RHO, temperature="individual" if individual else "global",
                         tau_init=0.1, chunk_size=5, group=group, distributed=distributed, dtype=torch.float64)
    scale = torch.tensor(12.0, dtype=torch.float64, requires_grad=True)
    out = {}
    for step, (a, b, idx) in enumerate(batches()):
        a, b = a[rows].clone().requires_grad_(), b[rows].clone().requires_grad_()
        loss = gcl(a, b, scale, idx[rows], step)
        scale.grad = None
        for p in gcl.temperature_parameters():
            p.grad = None
        loss.backward()
        gcl.commit()
        out[step] = {"loss": loss.detach(), "a": a.grad, "b": b.grad, "scale": scale.grad}
        if individual:
            dense = gcl.tau.values.grad.to_dense()
            out[step]["tau"] = torch.zeros(M, 2, dtype=torch.float64).index_put_(
                (gcl.tau.shard_indices(),), dense)
    if individual:  # distinct per sample, so that restoring them is seen
        gcl.tau.values.data[:] = (0.1 + 1e-3 * gcl.tau.shard_indices())[:, None]
    a, b, idx = batches()[0]
    gcl(a[rows], b[rows], scale, idx[rows], 5)  # not committed
    return out, gcl


def naive_steps(individual: bool) -> dict:
    """The same two steps on the full matrix with dense per-sample tables."""
    u = torch.full((M, 2), float("nan"), dtype=torch.float64)
    tau = torch.full((M, 2), 0.1, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(12.0, dtype=torch.float64, requires_grad=True)
    out = {}
    for step, (a, b, idx) in enumerate(batches()):
        a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
        s_img, s_txt = (1 / tau[idx, 0], 1 / tau[idx, 1]) if individual else (scale.expand(N), scale.expand(N))
        value, surrogate, new_u = naive(a, b, s_img, s_txt, u[idx, 0], u[idx, 1], GAMMA, RHO)
        leaves = [a, b, tau if individual else scale]
        ga, gb, gt = torch.autograd.grad(surrogate, leaves)
        out[step] = {"loss": value.detach(), "a": ga, "b": gb, ("tau" if individual else "scale"): gt}
        u[idx] = torch.stack(new_u, 1)
    out["u"] = u.log()
    return out


def compare(got: dict, want: dict, rows: slice, individual: bool) -> None:
    for step in (0, 1):
        torch.testing.assert_close(got[step]["loss"], want[step]["loss"], rtol=1e-12, atol=1e-12)
        for key in ("a", "b"):
            torch.testing.assert_close(got[step][key], want[step][key][rows], rtol=1e-10, atol=1e-12)


def reloaded(directory, individual: bool, group=None) -> GlobalClipLoss:
    """A fresh loss in this world, loaded from the files another world saved."""
    gcl = GlobalClipLoss(M, temperature="individual" if individual else "global", group=group, dtype=torch.float64)
    gcl.load(directory)
    return gcl


@pytest.mark.parametrize("individual", [False, True])
def test_state_single_process_equals_naive(individual, tmp_path):
    (got, gcl), want = run_steps(individual, slice(None), None), naive_steps(individual)
    compare(got, want, slice(None), individual)
    torch.testing.assert_close(gcl.log_u.values, want["u"], rtol=1e-12, atol=1e-12, equal_nan=True)
    key = "tau" if individual else "scale"
    torch.testing.assert_close(got[1][key], want[1][key], rtol=1e-10, atol=1e-12)
    gcl.save(tmp_path)
    torch.testing.assert_close(reloaded(tmp_path, individual).log_u.values, gcl.log_u.values, equal_nan=True)
    with pytest.raises(UserError, match="global_clip_rank"):
        reloaded(tmp_path / "missing", individual)
    with pytest.raises(UserError, match="temperature"):
        reloaded(tmp_path, not individual)


def worker(rank, world, port, individual, out_dir, mode):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = slice(rank * N // world, (rank + 1) * N // world)
    out, gcl = run_steps(individual, rows, dist.group.WORLD, mode)
    gcl.save(os.path.join(out_dir, "world2"))
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
    single.save(tmp_path / "world1")
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


def test_individual_temperatures_train_with_sparse_adam_and_stay_clamped():
    gcl = GlobalClipLoss(M, temperature="individual", tau_init=0.02, tau_min=0.01, tau_max=1.0, gamma=GAMMA)
    opt = torch.optim.SparseAdam(gcl.temperature_parameters(), lr=0.05)
    a, b, idx = batches()[0]
    before = gcl.tau.values.detach().clone()
    gcl(a.float(), b.float(), torch.tensor(1.0), idx, 0).backward()
    assert gcl.tau.values.grad.is_sparse
    opt.step()
    gcl.commit()
    moved = (gcl.tau.values.detach() != before).any(1)
    assert set(torch.nonzero(moved)[:, 0].tolist()) == set(idx.tolist())  # only the batch's samples
    assert gcl.tau.values.min() >= 0.01 and gcl.tau.values.max() <= 1.0
    seen = gcl.tau.values.detach()[idx]
    assert gcl.mean_temperature() == pytest.approx(seen.mean().item())
    assert not math.isnan(gcl.mean_temperature())
