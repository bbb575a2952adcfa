"""bf16 compute: every tiled loss on bf16 features stays within the documented tolerances of a float64
evaluation of the very same bf16 values (loss relative error <= 3e-3, gradient cosine >= 0.9999,
scale/bias gradient relative error <= 1e-2), while compute_dtype="fp32" reproduces the fp32 path."""
import pytest
import torch

from helpers.loss_refs import CASES, LOSS_RTOL, MIN_COSINE, SCALE_RTOL, bf16_values, errors, evaluate
from pipeline.losses import clip_loss


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
