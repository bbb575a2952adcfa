"""GradCache gives the gradients of one full-batch backward, with random patch dropout replayed."""
import pytest
import torch
from open_clip.loss import ClipLoss

from pipeline.models import build_model
from pipeline.models.config import ModelConfig
from pipeline.train.gradcache import grad_cache_step, split_batch

TINY = {
    "image": {"kind": "open_clip_vision",
              "options": {"image_size": 16, "patch_size": 4, "width": 32, "layers": 1, "head_width": 16,
                          "patch_dropout": 0.5}},
    "text": {"kind": "open_clip_text", "options": {"context_length": 8, "vocab_size": 100, "width": 32,
                                                  "heads": 2, "layers": 1}},
}


def _model(**model_options):
    torch.manual_seed(0)
    return build_model(ModelConfig(embed_dim=16, towers=TINY, **model_options)).train()


def _batch(n=10):
    g = torch.Generator().manual_seed(1)
    return {"image": torch.randn(n, 3, 16, 16, generator=g), "text": torch.randint(1, 100, (n, 8), generator=g)}


def _loss(features):
    return ClipLoss()(features["image"], features["text"], features["logit_scale"])


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_gradcache_matches_full_batch(batch, micro, loss_fn, **model_options):
    reference = _model(**model_options)
    torch.manual_seed(42)
    # One graph over the whole batch; chunked forward so dropout draws the same random numbers.
    outs = [reference(c) for c in split_batch(batch, micro)]
    scalars = {k: outs[0][k] for k in ("logit_scale", "logit_bias") if k in outs[0]}
    feats = {k: torch.cat([o[k] for o in outs]) for k in outs[0] if k not in scalars}
    ref_loss = loss_fn({**feats, **scalars})
    ref_loss.backward()

    cached = _model(**model_options)
    torch.manual_seed(42)
    loss = grad_cache_step(cached, loss_fn, lambda s: s.backward(), batch, micro)

    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    ref, got = _grads(reference), _grads(cached)
    assert ref.keys() == got.keys() and "logit_scale" in got
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("micro", [1, 3, 4, 10])
def test_gradcache_matches_full_batch_backward(micro):
    _assert_gradcache_matches_full_batch(_batch(), micro, _loss)


def test_patch_dropout_is_really_random():
    """Guard for the test above: without RNG replay the chunks would see other dropout masks."""
    model, batch = _model(), _batch()
    torch.manual_seed(3)
    a = model(batch)["image"]
    b = model(batch)["image"]
    assert not torch.allclose(a, b)


def test_nonfinite_loss_skips_backward():
    model, batch = _model(), _batch()
    calls = []
    loss = grad_cache_step(model, lambda f: _loss(f) * float("nan"), calls.append, batch, 3,
                           check_loss=lambda value: bool(torch.isfinite(value)))
    assert torch.isnan(loss) and calls == []


@pytest.mark.parametrize("micro", [3, 10])
def test_gradcache_with_hard_negatives_matches_full_batch_backward(micro):
    from pipeline.losses import clip_loss

    def loss_fn(f):
        return clip_loss(f["image"], f["text"], f["logit_scale"], hard_negatives=f["text_neg"],
                         hard_negative_alpha=0.5, hard_negative_beta=0.25)

    batch = {**_batch(), "text_neg": torch.randint(1, 100, (10, 2, 8), generator=torch.Generator().manual_seed(2))}
    _assert_gradcache_matches_full_batch(batch, micro, loss_fn)
