"""GradCache against one full-batch backward on a tiny model: the check every loss's contract test reuses."""
import pytest
import torch
from open_clip.loss import ClipLoss

from pipeline.models import build_model
from pipeline.models.config import ModelConfig
from pipeline.train.compile import compile_model
from pipeline.train.gradcache import grad_cache_step, split_batch

TINY = {
    "image": {"kind": "open_clip_vision",
              "options": {"image_size": 16, "patch_size": 4, "width": 32, "layers": 1, "head_width": 16,
                          "patch_dropout": 0.5}},
    "text": {"kind": "open_clip_text", "options": {"context_length": 8, "vocab_size": 100, "width": 32,
                                                  "heads": 2, "layers": 1}},
}


def tiny_model(compile="none", **model_options):
    """`compile` is train.compile, built by the aot_eager backend: dynamo's graphs and AOTAutograd's backward,
    without inductor's C++ builds (~35 s on 2 cores; tests/integration/test_train.py trains through them)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(embed_dim=16, towers=TINY, **model_options)).train()
    compile_model(model, compile, backend="aot_eager")
    return model


def gradcache_batch(n=10):
    g = torch.Generator().manual_seed(1)
    return {"image": torch.randn(n, 3, 16, 16, generator=g), "text": torch.randint(1, 100, (n, 8), generator=g)}


def clip_reference_loss(features):
    return ClipLoss()(features["image"], features["text"], features["logit_scale"])


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_gradcache_matches_full_batch(batch, micro, loss_fn, compile="none", **model_options):
    reference = tiny_model(compile, **model_options)
    torch.manual_seed(42)
    # One graph over the whole batch; chunked forward so dropout draws the same random numbers.
    outs = [reference(c) for c in split_batch(batch, micro)]
    scalars = {k: outs[0][k] for k in ("logit_scale", "logit_bias") if k in outs[0]}
    feats = {k: torch.cat([o[k] for o in outs]) for k in outs[0] if k not in scalars}
    ref_loss = loss_fn({**feats, **scalars})
    ref_loss.backward()

    cached = tiny_model(compile, **model_options)
    torch.manual_seed(42)
    loss = grad_cache_step(cached, loss_fn, lambda s: s.backward(), batch, micro)

    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    ref, got = grads_of(reference), grads_of(cached)
    assert ref.keys() == got.keys() and "logit_scale" in got
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-5, rtol=1e-5, msg=name)
