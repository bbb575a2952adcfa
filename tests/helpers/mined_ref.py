"""Mined and mixed negatives written out naively in float64, for the mining tests."""
import torch
import torch.nn.functional as F
from open_clip.loss import SigLipLoss

from helpers.loss_refs import naive_hn_nce
from pipeline.losses import clip_loss, siglip_loss
from pipeline.losses.objectives.mined_negatives import MixingDraws

N, D, K, S, S2 = 12, 6, 4, 3, 2


def features(seed):
    g = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=-1) for _ in range(2)]


def naive_negatives(a, b, draws):
    """Full-matrix top-k, then every mixture written out one anchor at a time."""
    z = (a @ b.T).fill_diagonal_(float("-inf"))
    top = z.topk(K, dim=1).indices
    alpha, beta = draws.alpha.double(), draws.beta.double()
    out = []
    for i in range(a.shape[0]):
        hard = b[top[i]]
        mixed = [alpha[i, t] * hard[p] + (1 - alpha[i, t]) * hard[q] for t, (p, q) in
                 enumerate(draws.pairs[i].tolist())]
        mixed += [beta[i, t] * a[i] + (1 - beta[i, t]) * hard[r] for t, r in
                  enumerate(draws.partner[i].tolist())]
        out.append(F.normalize(torch.stack(mixed), dim=-1))
    return top, torch.stack(out)


def draws(step):
    return MixingDraws.draw(torch.Generator().manual_seed(step), N, K, S, S2)


def mined_losses(a, b, s, t, negs, group=None):
    return {"clip": clip_loss(a, b, s, chunk_size=5, hard_negatives=negs, hard_negative_alpha=0.5,
                              hard_negative_beta=0.3, group=group),
            "siglip": siglip_loss(a, b, s, t, chunk_size=5, hard_negatives=negs, group=group)}


def naive_losses(a, b, s, t, negs):
    pairs = SigLipLoss()(a, b, s, t) * N + F.softplus(s * torch.einsum("nd,nkd->nk", a, negs) + t).sum()
    return {"clip": naive_hn_nce(a, b, s, negs, 0.5, 0.3), "siglip": pairs / N}


def leaves(a, b):
    return (a.clone().requires_grad_(), b.clone().requires_grad_(),
            torch.tensor(6.0, dtype=torch.float64, requires_grad=True),
            torch.tensor(-2.0, dtype=torch.float64, requires_grad=True))
