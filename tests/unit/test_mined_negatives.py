"""Mined/mixed hard negatives equal a naive float64 full-matrix version: the top-k, the MoCHi mixtures
(given the same draws) and the clip/siglip losses and gradients with them, alone and over 2 gloo ranks."""

import pytest
import torch

from helpers.mined_ref import S2, D, K, N, S, draws, features, leaves, mined_losses, naive_losses, naive_negatives
from pipeline.losses.objectives.mined_negatives import MinedNegatives
from pipeline.losses.tiles import TileSpec, top_k_negatives


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_top_k_equals_full_matrix_top_k(chunk):
    a, b = features(0)
    values, indices = top_k_negatives(a, b, K, TileSpec.resolve(a.device, chunk))
    z = (a @ b.T).fill_diagonal_(float("-inf"))
    want = z.topk(K, dim=1)
    assert torch.equal(indices, want.indices)
    torch.testing.assert_close(values, want.values, rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="top_k"):
        top_k_negatives(a, b, N, TileSpec.resolve(a.device))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_mixed_negatives_and_losses_equal_naive_reference(kind):
    a, b = features(1)
    mined = MinedNegatives(top_k=K, mixed=S, mix_with_anchor=S2, chunk_size=5)
    negs = mined(a, b, step=7, generator=torch.Generator().manual_seed(7))
    _, want = naive_negatives(a, b, draws(7))
    torch.testing.assert_close(negs, want, rtol=1e-12, atol=1e-14)
    assert not negs.requires_grad  # detached, as in MoCHi
    x, y = leaves(a, b), leaves(a, b)
    out, ref = mined_losses(*x, negs)[kind], naive_losses(*y, want)[kind]
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    used = [0, 1, 2] + ([3] if kind == "siglip" else [])
    for got, exp in zip(torch.autograd.grad(out, [x[i] for i in used]), torch.autograd.grad(ref, [y[i] for i in used])):
        torch.testing.assert_close(got, exp, rtol=1e-9, atol=1e-12)


def test_start_step_and_reproducible_draws():
    a, b = features(2)
    mined = MinedNegatives(top_k=K, mixed=S, mix_with_anchor=0, start_step=10)
    assert mined(a, b, step=9, generator=torch.Generator().manual_seed(9)) is None
    first = mined(a, b, step=10, generator=torch.Generator().manual_seed(10))
    assert first.shape == (N, S, D)
    assert torch.equal(first, mined(a, b, step=10, generator=torch.Generator().manual_seed(10)))
    assert not torch.equal(first, mined(a, b, step=10, generator=torch.Generator().manual_seed(11)))
    with pytest.raises(ValueError, match="mixed"):
        MinedNegatives(top_k=K, mixed=0, mix_with_anchor=0)


