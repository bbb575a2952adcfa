"""Tiled losses equal naive float64 references, open_clip's losses and the symile package, value and gradient."""
import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss
from symile import Symile

from helpers.loss_refs import naive_hn_nce
from pipeline.errors import UserError
from pipeline.losses import build_loss, clip_loss, loss_config, siglip_loss, symile_loss

torch.manual_seed(0)


def unit(*shape, dtype=torch.float64):
    return F.normalize(torch.randn(*shape, dtype=dtype), dim=-1).requires_grad_()


def scalar(v, dtype=torch.float64):
    return torch.tensor(v, dtype=dtype, requires_grad=True)


def assert_same(out, ref, inputs, rtol=1e-6, atol=1e-9):
    got = torch.autograd.grad(out, inputs)
    want = torch.autograd.grad(ref, inputs)
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)


@pytest.mark.parametrize("chunk", [1, 5, 23, 64, None])
def test_clip_equals_open_clip(chunk):
    a, b, s = unit(23, 8), unit(23, 8), scalar(7.0)
    assert_same(clip_loss(a, b, s, chunk_size=chunk), ClipLoss()(a, b, s), [a, b, s])


@pytest.mark.parametrize("alpha,beta", [(1.0, 0.0), (0.0, 0.0), (0.5, 0.7), (1.0, 0.3)])
@pytest.mark.parametrize("k", [1, 3])
def test_clip_hard_negatives_and_hn_nce(alpha, beta, k):
    a, b, s, negs = unit(13, 6), unit(13, 6), scalar(4.0), unit(13, k, 6)
    out = clip_loss(a, b, s, chunk_size=4, hard_negatives=negs, hard_negative_alpha=alpha, hard_negative_beta=beta)
    assert_same(out, naive_hn_nce(a, b, s, negs, alpha, beta), [a, b, s, negs])


def test_clip_gradcheck():
    a, b, s, negs = unit(7, 4), unit(7, 4), scalar(3.0), unit(7, 2, 4)
    assert torch.autograd.gradcheck(
        lambda a, b, s, n: clip_loss(a, b, s, chunk_size=3, hard_negatives=n, hard_negative_alpha=0.5,
                                     hard_negative_beta=0.4), (a, b, s, negs))


@pytest.mark.parametrize("chunk", [1, 6, 100])
def test_siglip_equals_open_clip(chunk):
    a, b, s, t = unit(17, 8), unit(17, 8), scalar(10.0), scalar(-10.0)
    assert_same(siglip_loss(a, b, s, t, chunk_size=chunk), SigLipLoss()(a, b, s, t), [a, b, s, t])


def test_siglip_hard_negatives_and_gradcheck():
    a, b, s, t, negs = unit(9, 5), unit(9, 5), scalar(3.0), scalar(-2.0), unit(9, 2, 5)
    naive = (SigLipLoss()(a, b, s, t) * 9 + F.softplus(s * torch.einsum("nd,nkd->nk", a, negs) + t).sum()) / 9
    assert_same(siglip_loss(a, b, s, t, chunk_size=4, hard_negatives=negs), naive, [a, b, s, t, negs])
    assert torch.autograd.gradcheck(lambda *x: siglip_loss(*x[:4], chunk_size=2, hard_negatives=x[4]),
                                    (a, b, s, t, negs))


@pytest.mark.parametrize("m,chunk", [(3, 1), (3, 4), (3, 64), (4, 2), (4, 64)])
def test_symile_n_squared_equals_package(m, chunk):
    feats, s = [unit(9 if m == 3 else 6, 5) for _ in range(m)], scalar(6.0)
    assert_same(symile_loss(feats, s, negatives="n_squared", chunk_size=chunk), Symile("n_squared")(feats, s),
                feats + [s])


@pytest.mark.parametrize("m", [2, 3, 4])
def test_symile_n_equals_package_with_the_same_permutations(m):
    feats, s = [unit(11, 5) for _ in range(m)], scalar(6.0)
    torch.manual_seed(3)
    ref = Symile("n")(feats, s) if m > 2 else None
    torch.manual_seed(3)
    out = symile_loss(feats, s, negatives="n", chunk_size=4)
    if m == 2:  # the package needs 3+ modalities; with 2, "n" is InfoNCE's row direction with shuffled columns
        assert torch.isfinite(out)
        return
    assert_same(out, ref, feats + [s])


def test_symile_two_modalities_n_squared_is_infonce_rows():
    a, b, s = unit(10, 4), unit(10, 4), scalar(5.0)
    rows = F.cross_entropy(s * a @ b.T, torch.arange(10))
    cols = F.cross_entropy(s * b @ a.T, torch.arange(10))
    assert_same(symile_loss([a, b], s, negatives="n_squared", chunk_size=3), (rows + cols) / 2, [a, b, s])


def test_symile_gradcheck():
    feats, s = [unit(5, 3) for _ in range(3)], scalar(4.0)
    assert torch.autograd.gradcheck(lambda s, *f: symile_loss(list(f), s, negatives="n_squared", chunk_size=2),
                                    (s, *feats))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_fp32(dtype):
    a64, b64 = unit(40, 16), unit(40, 16)
    a, b = a64.detach().to(dtype).requires_grad_(), b64.detach().to(dtype).requires_grad_()
    s = torch.tensor(20.0)
    out = clip_loss(a, b, s, chunk_size=7)
    out.backward()
    assert out.dtype == torch.float32 and a.grad.dtype == dtype
    exact = ClipLoss()(a.detach().double(), b.detach().double(), s.double())
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    assert abs(out.double().item() - exact.item()) <= tol * abs(exact.item())


def test_column_sums_stay_exact_when_a_tile_spans_more_than_fp32_exp_range():
    """Column j's logits all sit ~200 below the tile maximum: its one-pass column sum underflows in
    fp32 and must be redone directly, else its log-denominator loses log(B)."""
    e1 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    a = F.normalize(e1 + 0.01 * torch.randn(6, 3, dtype=torch.float64), dim=-1)
    b = a.clone()
    b[2] = F.normalize(-e1 + 0.01 * torch.randn(3, dtype=torch.float64), dim=0)
    s = torch.tensor(100.0, dtype=torch.float64)
    ref = ClipLoss()(a, b, s)
    out = clip_loss(a.float(), b.float(), s.float())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=0)


def test_fp32_matches_float64_reference_to_1e_4():
    a64, b64, s = unit(300, 32), unit(300, 32), scalar(30.0)
    a, b = a64.detach().float().requires_grad_(), b64.detach().float().requires_grad_()
    out = clip_loss(a, b, s.detach().float(), chunk_size=64)
    ga, = torch.autograd.grad(out, [a])
    ref = ClipLoss()(a64, b64, s)
    ra, = torch.autograd.grad(ref, [a64])
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=0)
    torch.testing.assert_close(ga.double(), ra, rtol=1e-4, atol=1e-7)


def test_module_averages_pairs_and_routes_hard_negatives():
    f = {m: unit(8, 4) for m in ("audio", "image", "text")}
    s, negs = scalar(5.0), unit(8, 2, 4)
    loss = build_loss(loss_config("clip", chunk_size=3))({**f, "text_neg": negs, "logit_scale": s})
    ref = (clip_loss(f["audio"], f["image"], s) + clip_loss(f["audio"], f["text"], s, hard_negatives=negs)
           + clip_loss(f["image"], f["text"], s, hard_negatives=negs)) / 3
    assert_same(loss, ref, list(f.values()) + [s, negs])
    with pytest.raises(UserError, match="logit bias"):
        build_loss(loss_config("siglip"))({**f, "logit_scale": s})


def test_symile_module_is_reproducible_per_step():
    f, s = [unit(8, 4) for _ in range(3)], scalar(5.0)
    loss = build_loss(loss_config("symile", negatives="n"))
    features = {**dict(zip("abc", f)), "logit_scale": s}
    assert loss(features, step=7).item() == loss(features, step=7).item() != loss(features, step=8).item()
