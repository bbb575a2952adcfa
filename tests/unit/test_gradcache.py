"""GradCache gives the gradients of one full-batch backward, with random patch dropout replayed."""
import pytest
import torch

from helpers.gradcache import (
    assert_gradcache_matches_full_batch,
    clip_reference_loss,
    gradcache_batch,
    tiny_model,
)
from pipeline.train.gradcache import grad_cache_step


@pytest.mark.parametrize("micro", [1, 3, 4, 10])
def test_gradcache_matches_full_batch_backward(micro):
    assert_gradcache_matches_full_batch(gradcache_batch(), micro, clip_reference_loss)


def test_patch_dropout_is_really_random():
    """Guard for the test above: without RNG replay the chunks would see other dropout masks."""
    model, batch = tiny_model(), gradcache_batch()
    torch.manual_seed(3)
    a = model(batch)["image"]
    b = model(batch)["image"]
    assert not torch.allclose(a, b)


def test_nonfinite_loss_skips_backward():
    model, batch = tiny_model(), gradcache_batch()
    calls = []
    loss = grad_cache_step(model, lambda f: clip_reference_loss(f) * float("nan"), calls.append, batch, 3,
                           check_loss=lambda value: bool(torch.isfinite(value)))
    assert torch.isnan(loss) and calls == []


@pytest.mark.parametrize("micro", [3, 10])
def test_gradcache_with_hard_negatives_matches_full_batch_backward(micro):
    from pipeline.losses import clip_loss

    def loss_fn(f):
        return clip_loss(f["image"], f["text"], f["logit_scale"], hard_negatives=f["text_neg"],
                         hard_negative_alpha=0.5, hard_negative_beta=0.25)

    batch = {**gradcache_batch(), "text_neg": torch.randint(1, 100, (10, 2, 8), generator=torch.Generator().manual_seed(2))}
    assert_gradcache_matches_full_batch(batch, micro, loss_fn)
