"""The loss contract suite's table: every registered loss kind with a naive float64 reference.

docs/extending.md's loss example is imported from the doc's own text and registered here, so the whole
suite (value and gradients, bf16, GradCache, 1 vs 2 vs 3 ranks) checks the example a user copies.
"""
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss
from symile import Symile

from helpers.doc_examples import import_loss_example
from pipeline.losses import build_loss, loss_config

B, D = 12, 6
TEMPER = 2.0  # the doc example's own option, set away from its default
import_loss_example()  # registers "tempered_clip"


def pairs(features, fn):
    mods = sorted(k for k in features if k not in ("logit_scale", "logit_bias"))
    terms = [fn(features[x], features[y]) for i, x in enumerate(mods) for y in mods[i + 1:]]
    return sum(terms) / len(terms)


def global_contrastive(f, rho=8.0):
    """SogCLR/FastCLIP's objective at a first step (u = the batch's own estimate): ½ mean over both anchor
    directions of τ·(log g_i + ρ), g_i = mean over j≠i of exp((z_ij − z_ii)/τ), τ = 1/logit_scale."""
    a, b = (f[m] for m in sorted(k for k in f if not k.startswith("logit")))
    s, z = f["logit_scale"], a @ b.T
    off = ~torch.eye(len(z), dtype=torch.bool)

    def direction(logits):
        g = (torch.exp(s * (logits - logits.diagonal()[:, None])) * off).sum(1) / (len(z) - 1)
        return ((torch.log(g) + rho) / s).mean()
    return 0.5 * (direction(z) + direction(z.T))


REFERENCES = {
    "global_clip": ({"chunk_size": 5}, global_contrastive),
    "tempered_clip": ({"chunk_size": 5, "temper": TEMPER},
                      lambda f: pairs(f, lambda a, b: ClipLoss()(a, b, f["logit_scale"] / TEMPER))),
    "clip": ({"chunk_size": 5}, lambda f: pairs(f, lambda a, b: ClipLoss()(a, b, f["logit_scale"]))),
    "siglip": ({"chunk_size": 5},
               lambda f: pairs(f, lambda a, b: SigLipLoss()(a, b, f["logit_scale"], f["logit_bias"]))),
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
