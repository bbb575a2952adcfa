"""Conformance of every registered loss to the contract in pipeline/losses/base.py.

Each loss kind has a naive float64 full-matrix reference here; a newly registered loss fails
`test_every_registered_loss_has_a_reference` until it gets one, and from then on is checked for value and
gradients, 1 vs 2 vs 3 gloo ranks (every rank the global loss, gradient shares summing to the
single-process gradient), GradCache against one full-batch backward, and bf16 inputs.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss
from symile import Symile
from test_gradcache import _assert_gradcache_matches_full_batch, _batch
from test_tiled_losses_distributed import free_port

from pipeline.losses import build_loss, loss_config
from pipeline.registry import LOSSES

B, D = 12, 6


def _pairs(features, fn):
    mods = sorted(k for k in features if k not in ("logit_scale", "logit_bias"))
    terms = [fn(features[x], features[y]) for i, x in enumerate(mods) for y in mods[i + 1:]]
    return sum(terms) / len(terms)


def _global_contrastive(f, rho=8.0):
    """SogCLR/FastCLIP's objective at a first step (u = the batch's own estimate): ½ mean over both anchor
    directions of τ·(log g_i + ρ), g_i = mean over j≠i of exp((z_ij − z_ii)/τ), τ = 1/logit_scale."""
    a, b = (f[m] for m in sorted(k for k in f if not k.startswith("logit")))
    s, z = f["logit_scale"], a @ b.T
    off = ~torch.eye(len(z), dtype=torch.bool)

    def direction(logits):
        g = (torch.exp(s * (logits - logits.diagonal()[:, None])) * off).sum(1) / (len(z) - 1)
        return ((torch.log(g) + rho) / s).mean()
    return 0.5 * (direction(z) + direction(z.T))


# kind -> (options for the conformance runs, naive float64 reference of the same loss)
REFERENCES = {
    "global_clip": ({"chunk_size": 5}, _global_contrastive),
    "clip": ({"chunk_size": 5}, lambda f: _pairs(f, lambda a, b: ClipLoss()(a, b, f["logit_scale"]))),
    "siglip": ({"chunk_size": 5},
               lambda f: _pairs(f, lambda a, b: SigLipLoss()(a, b, f["logit_scale"], f["logit_bias"]))),
    "symile": ({"chunk_size": 5, "negatives": "n_squared"},
               lambda f: Symile("n_squared")([f[m] for m in sorted(k for k in f if not k.startswith("logit"))],
                                             f["logit_scale"])),
}


def modalities_for(kind):
    return ("image", "text") if kind == "global_clip" else ("audio", "image", "text")


def build(kind, group=None):
    options, _ = REFERENCES[kind]
    return build_loss(loss_config(kind, **options), group=group, num_samples=B)


def call(loss, x, rows=slice(None)):
    return loss(x, step=3, index=torch.arange(B)[rows])


def features(modalities=("audio", "image", "text"), dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    out = {m: F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1).to(dtype) for m in modalities}
    return {**out, "logit_scale": torch.tensor(5.0, dtype=dtype), "logit_bias": torch.tensor(-2.0, dtype=dtype)}


def leaves(f):
    return {k: v.clone().requires_grad_() for k, v in f.items()}


def loss_and_grads(loss_fn, f):
    x = leaves(f)
    loss = loss_fn(x)
    loss.backward()
    return loss.detach(), {k: v.grad for k, v in x.items()}


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
    _assert_gradcache_matches_full_batch(_batch(), 3, lambda f: loss(f, step=1, index=torch.arange(10)), **bias)


def _rank(rank, world, port, kind, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = slice(rank * B // world, (rank + 1) * B // world)
    local = {k: v[rows] if v.ndim else v for k, v in features(modalities_for(kind)).items()}
    loss = build(kind, group=dist.group.WORLD)
    value, grads = loss_and_grads(lambda x: call(loss, x, rows), local)
    torch.save({"loss": value, "grads": grads}, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("kind", sorted(REFERENCES))
def test_ranks_return_the_global_loss_and_their_share_of_the_gradient(kind, world, tmp_path):
    mp.spawn(_rank, args=(world, free_port(), kind, str(tmp_path)), nprocs=world)
    loss = build(kind)
    want, want_g = loss_and_grads(lambda x: call(loss, x), features(modalities_for(kind)))
    results = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(world)]
    for r, res in enumerate(results):
        torch.testing.assert_close(res["loss"], want, rtol=1e-10, atol=1e-12)
        rows = slice(r * B // world, (r + 1) * B // world)
        for k, v in want_g.items():
            if v is not None and v.ndim:
                torch.testing.assert_close(res["grads"][k], v[rows], rtol=1e-9, atol=1e-12, msg=k)
    for k, v in want_g.items():
        if v is not None and not v.ndim:  # scalars: the shares sum to the single-process gradient
            torch.testing.assert_close(sum(res["grads"][k] for res in results), v, rtol=1e-9, atol=1e-12, msg=k)
