"""Fused loss tiles (pipeline/losses/tiles/kernels.py): each compiled kernel computes what its eager self does,
the losses built on them keep their float64 tolerances with full tiles fused, a changing logit scale
compiles nothing new (the fallback without a compiler: tests/integration/test_loss_kernels_fallback.py)."""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from helpers.loss_refs import CASES, bf16_values, errors
from pipeline.compiled import Compiled
from pipeline.losses.tiles.kernels import MIN_FUSED, exp_sums, sigmoid_tile, softmax_sum, softplus, softplus_sum

CHUNK = 256
assert CHUNK * CHUNK == MIN_FUSED  # the smallest tile that is fused


def unit_rows(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_each_fused_kernel_computes_what_its_eager_self_does(dtype):
    a, b = unit_rows(CHUNK, 64, 0).to(dtype), unit_rows(CHUNK, 64, 1).to(dtype)
    dots = a @ b.T
    masked = dots.masked_fill(torch.eye(CHUNK, dtype=torch.bool), float("-inf"))  # a diagonal tile
    s, s_sig, t = torch.tensor(30.0), torch.tensor(10.0), torch.tensor([-10.0])
    d_row, d_col = (torch.logsumexp(30 * dots.float(), dim) for dim in (1, 0))
    calls = [(exp_sums, (masked, s, True)), (exp_sums, (dots, s, False)), (softmax_sum, (dots, s, d_row, d_col, dtype)),
             (softmax_sum, (dots, s, d_row, None, dtype)), (softplus_sum, (dots, s_sig, t)),
             (sigmoid_tile, (dots, s_sig, t, dtype))]
    torch._dynamo.reset()  # compiled anew here, whatever ran before in this process
    graphs = counters["stats"]["unique_graphs"]
    for kernel, args in calls:
        fused, eager = kernel(*args, full=True), kernel(*args, full=False)
        for f, e in zip(*(x if isinstance(x, tuple) else (x,) for x in (fused, eager))):
            if f is None:
                assert e is None
                continue
            assert f.dtype == e.dtype and f.shape == e.shape
            rtol = 1e-2 if f.dtype == torch.bfloat16 else 2e-5  # bf16: one rounding step apart at most
            torch.testing.assert_close(f, e, rtol=rtol, atol=1e-30)
    assert Compiled.broken is None and counters["stats"]["unique_graphs"] > graphs  # really compiled


def test_softplus_is_exact_over_the_whole_range():
    z = torch.cat([torch.linspace(-80, 80, 400_001), torch.tensor([-1e-8, 0.0, 1e-8])])  # fp32 normals
    want = F.softplus(z.double(), threshold=1e9)
    assert ((softplus(z).double() - want).abs() / want).max() < 1e-6
    assert softplus(torch.tensor([-1e4, float("-inf"), 1e4])).tolist() == [0.0, 0.0, 1e4]


FUSED_CASES = ["clip", "clip_hard_negatives_hn_nce", "siglip"]


def evaluate(case, feats, negs, dtype):
    """As in test_tiled_losses_bf16, with CHUNK-row tiles: 600 rows make 4 full tiles, and edges."""
    leaves = [t.to(dtype).clone().requires_grad_() for t in (*feats, negs)]
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    s = torch.tensor(30.0 if case.startswith("clip") else 10.0, dtype=stat, requires_grad=True)
    t = torch.tensor(-10.0, dtype=stat, requires_grad=True)
    loss = CASES[case](leaves[:-1], leaves[-1], s, t, chunk_size=CHUNK)
    loss.backward()
    return loss, [x.grad for x in leaves if x.grad is not None], [x.grad for x in (s, t) if x.grad is not None]


@pytest.mark.parametrize("case", FUSED_CASES)
def test_losses_with_fused_tiles_match_float64_and_the_eager_path(case, monkeypatch):
    feats, negs = bf16_values(600, 48, 2, seed=3)
    ref = evaluate(case, feats, negs, torch.float64)
    for dtype, (loss_rtol, min_cosine) in ((torch.bfloat16, (3e-3, 0.9999)), (torch.float32, (1e-6, 1 - 1e-6))):
        fused = evaluate(case, feats, negs, dtype)
        err = errors(fused, ref)
        assert err["loss"] <= loss_rtol and err["cosine"] >= min_cosine and err["scalars"] <= 1e-2, (dtype, err)
        with monkeypatch.context() as m:
            m.setattr(Compiled, "broken", "off in this test")
            eager = evaluate(case, feats, negs, dtype)
        same = errors(fused, [eager[0].double(), [g.double() for g in eager[1]], [g.double() for g in eager[2]]])
        assert same["loss"] <= 1e-6 and same["cosine"] >= 1 - 1e-6 and same["scalars"] <= 1e-5, (dtype, same)
    assert Compiled.broken is None


def test_a_changing_logit_scale_or_batch_compiles_nothing_new():
    a, b = unit_rows(600, 32, 0).requires_grad_(), unit_rows(600, 32, 1).requires_grad_()
    from pipeline.losses import clip_loss

    def step(scale, rows):
        clip_loss(a[:rows], b[:rows], torch.tensor(scale, requires_grad=True), chunk_size=CHUNK).backward()

    step(20.0, 600)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0 and Compiled.broken is None
    for scale, rows in ((35.0, 600), (70.0, 560), (100.0, 512)):
        step(scale, rows)
    assert counters["stats"]["unique_graphs"] == graphs


