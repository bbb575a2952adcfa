"""The global contrastive loss equals a naive float64 full-matrix version of the same update rule
(value, gradients, u updates), alone and with its sharded state over 2 gloo ranks; state round trips."""
import math

import pytest
import torch

from helpers.global_clip_ref import (
    GAMMA,
    RHO,
    D,
    N,
    batches,
    compare,
    expand,
    global_clip,
    naive,
    naive_steps,
    reloaded,
    run_steps,
    save,
    unit,
)
from pipeline.errors import UserError
from pipeline.losses.objectives.global_clip import gamma_at, global_clip_loss


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
        global_clip(False, gamma_schedule="linear")
    with pytest.raises(ValueError, match="gamma_decay_steps"):
        global_clip(False, gamma_schedule="cosine")


@pytest.mark.parametrize("individual", [False, True])
def test_state_single_process_equals_naive(individual, tmp_path):
    (got, gcl), want = run_steps(individual, slice(None), None), naive_steps(individual)
    compare(got, want, slice(None), individual)
    torch.testing.assert_close(gcl.log_u.values, want["u"], rtol=1e-12, atol=1e-12, equal_nan=True)
    key = "tau" if individual else "scale"
    torch.testing.assert_close(got[1][key], want[1][key], rtol=1e-10, atol=1e-12)
    save(gcl, tmp_path)
    torch.testing.assert_close(reloaded(tmp_path, individual).log_u.values, gcl.log_u.values, equal_nan=True)
    with pytest.raises(UserError, match="temperature"):
        reloaded(tmp_path, not individual)


def test_individual_temperatures_train_with_sparse_adam_and_stay_clamped():
    gcl = global_clip(True, tau_init=0.02, tau_min=0.01, tau_max=1.0, gamma=GAMMA)
    a, b, idx = batches()[0]
    before = gcl.tau.values.detach().clone()
    gcl.anchor_loss(a, b, torch.tensor(1.0, dtype=torch.float64), idx, 0).backward()
    assert gcl.tau.values.grad.is_sparse
    gcl.step_end(finite=True)  # its SparseAdam steps, then the step's u are kept and τ clamped
    moved = (gcl.tau.values.detach() != before).any(1)
    assert set(torch.nonzero(moved)[:, 0].tolist()) == set(idx.tolist())  # only the batch's samples
    assert gcl.tau.values.min() >= 0.01 and gcl.tau.values.max() <= 1.0
    seen = gcl.tau.values.detach()[idx]
    assert gcl.mean_temperature() == pytest.approx(seen.mean().item())
    assert not math.isnan(gcl.mean_temperature())
