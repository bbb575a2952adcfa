"""bf16 compute: every tiled loss on bf16 features stays within the documented tolerances of a float64
evaluation of the very same bf16 values (loss relative error <= 3e-3, gradient cosine >= 0.9999,
scale/bias gradient relative error <= 1e-2), while compute_dtype="fp32" reproduces the fp32 path."""
import pytest
import torch
import torch.nn.functional as F

from pipeline.losses import clip_loss, siglip_loss, symile_loss

LOSS_RTOL, MIN_COSINE, SCALE_RTOL = 3e-3, 0.9999, 1e-2


def bf16_values(b, d, m, seed):
    """m modalities of unit rows, bf16-rounded, each row correlated with the first modality's
    (positives ~0.4 cosine, as in a trained CLIP), plus [b, 2, d] hard negatives."""
    g = torch.Generator().manual_seed(seed)
    base = F.normalize(torch.randn(b, d, generator=g), dim=-1)
    feats = [base] + [F.normalize(base + 2 * F.normalize(torch.randn(b, d, generator=g), dim=-1), dim=-1)
                      for _ in range(m - 1)]
    negs = F.normalize(base[:, None] + 2 * F.normalize(torch.randn(b, 2, d, generator=g), dim=-1), dim=-1)
    return [f.bfloat16() for f in feats], negs.bfloat16()


CASES = {
    "clip": lambda f, n, s, t, **kw: clip_loss(f[0], f[1], s, **kw),
    "clip_hard_negatives_hn_nce": lambda f, n, s, t, **kw: clip_loss(
        f[0], f[1], s, hard_negatives=n, hard_negative_alpha=0.5, hard_negative_beta=0.3, **kw),
    "siglip": lambda f, n, s, t, **kw: siglip_loss(f[0], f[1], s, t, **kw),
    "siglip_hard_negatives": lambda f, n, s, t, **kw: siglip_loss(f[0], f[1], s, t, hard_negatives=n, **kw),
    "symile_n": lambda f, n, s, t, **kw: symile_loss(f, s, negatives="n", generator=torch.Generator().manual_seed(5),
                                                     **kw),
    "symile_n_squared": lambda f, n, s, t, **kw: symile_loss(f, s, negatives="n_squared", **kw),
}


def evaluate(case, feats, negs, dtype, **kw):
    """Loss and gradients (features, hard negatives, scale, bias) of `case` on the values cast to `dtype`."""
    leaves = [t.to(dtype).clone().requires_grad_() for t in (*feats, negs)]
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    s = torch.tensor(30.0 if case.startswith(("clip", "symile")) else 10.0, dtype=stat, requires_grad=True)
    t = torch.tensor(-10.0, dtype=stat, requires_grad=True)
    loss = CASES[case](leaves[:-1], leaves[-1], s, t, chunk_size=37, **kw)
    loss.backward()
    return loss, [x.grad for x in leaves if x.grad is not None], [x.grad for x in (s, t) if x.grad is not None]


def errors(got, want):
    (loss, grads, scalars), (ref_loss, ref_grads, ref_scalars) = got, want
    return {"loss": abs(loss.double() - ref_loss).item() / abs(ref_loss).item(),
            "cosine": min(F.cosine_similarity(g.double().flatten(), w.flatten(), 0).item()
                          for g, w in zip(grads, ref_grads)),
            "scalars": max([abs(g.double() - w).item() / abs(w).item() for g, w in zip(scalars, ref_scalars)],
                           default=0.0)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bf16_compute_is_close_to_float64_of_the_same_values(case):
    b, m = (12, 3) if case == "symile_n_squared" else (150, 3 if case.startswith("symile") else 2)
    feats, negs = bf16_values(b, 48, m, seed=len(case))
    ref = evaluate(case, feats, negs, torch.float64)
    got = evaluate(case, feats, negs, torch.bfloat16)
    assert got[0].dtype == torch.float32 and all(g.dtype == torch.bfloat16 for g in got[1])
    assert len(got[1]) == len(ref[1]) and len(got[2]) == len(ref[2])
    err = errors(got, ref)
    assert err["loss"] <= LOSS_RTOL and err["cosine"] >= MIN_COSINE and err["scalars"] <= SCALE_RTOL, err


@pytest.mark.parametrize("case", ["clip_hard_negatives_hn_nce", "siglip", "symile_n_squared"])
def test_fp32_compute_dtype_casts_bf16_inputs_to_fp32(case):
    b, m = (12, 3) if case == "symile_n_squared" else (150, 3 if case.startswith("symile") else 2)
    feats, negs = bf16_values(b, 48, m, seed=1)
    ref = evaluate(case, feats, negs, torch.float64)
    fp32 = errors(evaluate(case, feats, negs, torch.bfloat16, compute_dtype="fp32"), ref)
    auto = errors(evaluate(case, feats, negs, torch.bfloat16), ref)
    assert fp32["loss"] <= 1e-6 and fp32["cosine"] >= 1 - 1e-5 and fp32["scalars"] <= 1e-5, fp32
    assert auto["loss"] > fp32["loss"]  # "auto" really ran the GEMMs in bf16


def test_unknown_compute_dtype_is_refused():
    a = torch.randn(4, 3)
    with pytest.raises(ValueError, match="compute_dtype"):
        clip_loss(a, a, torch.tensor(1.0), compute_dtype="bf16")
