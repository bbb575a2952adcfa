"""Conformance of every registered loss to the contract in pipeline/losses/base.py.

Each loss kind has a naive float64 full-matrix reference here; a newly registered loss fails
`test_every_registered_loss_has_a_reference` until it gets one, and from then on is checked for value and
gradients, 1 vs 2 vs 3 gloo ranks (every rank the global loss, gradient shares summing to the
single-process gradient), GradCache against one full-batch backward, and bf16 inputs.
"""

import pytest
import torch

from helpers.gradcache import assert_gradcache_matches_full_batch, gradcache_batch
from helpers.loss_contract import REFERENCES, build, call, features, loss_and_grads, modalities_for
from pipeline.registry import LOSSES

# kind -> (options for the conformance runs, naive float64 reference of the same loss)


def test_every_registered_loss_has_a_reference():
    assert set(LOSSES.names()) <= set(REFERENCES), "add the new loss's float64 reference to REFERENCES"


@pytest.mark.parametrize("kind", sorted(REFERENCES))
def test_value_and_gradients_equal_the_float64_reference(kind):
    loss, reference = build(kind), REFERENCES[kind][1]
    got, got_g = loss_and_grads(lambda x: call(loss, x), features(modalities_for(kind)))
    want, want_g = loss_and_grads(reference, features(modalities_for(kind)))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for k, v in want_g.items():
        if v is not None:
            torch.testing.assert_close(got_g[k], v, rtol=1e-9, atol=1e-12, msg=k)


@pytest.mark.parametrize("kind", sorted(REFERENCES))
def test_bf16_features_give_the_fp32_loss_to_bf16_precision(kind):
    loss = build(kind)
    low, low_g = loss_and_grads(lambda x: call(loss, x), features(modalities_for(kind), torch.bfloat16))
    high = call(loss, features(modalities_for(kind), torch.float32))
    assert low.dtype == torch.float32 and torch.isfinite(low)  # the value keeps its statistics' precision
    assert low.float().item() == pytest.approx(high.item(), rel=2e-2)
    assert all(g is None or g.dtype == torch.bfloat16 for g in low_g.values())


@pytest.mark.parametrize("kind", sorted(REFERENCES))
def test_gradcache_equals_one_full_batch_backward(kind):
    loss = build(kind)
    bias = {"init_logit_bias": -2.0} if "logit_bias" in LOSSES.get(kind, "").obj.requires else {}
    assert_gradcache_matches_full_batch(gradcache_batch(), 3, lambda f: loss(f, step=1, index=torch.arange(10)), **bias)


