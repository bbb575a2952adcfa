"""Float64 references and bf16 error measures the loss tests share."""
import torch
import torch.nn.functional as F

from pipeline.losses import clip_loss, siglip_loss, symile_loss

LOSS_RTOL, MIN_COSINE, SCALE_RTOL = 3e-3, 0.9999, 1e-2


def naive_hn_nce(a, b, s, negs=None, alpha=1.0, beta=0.0):
    """DiHT's HN-NCE written out row by row on the full matrix (both directions; negatives a→b only)."""
    z = s * a @ b.T

    def log_denominators(z, extra=None):
        out = []
        for i in range(z.shape[0]):
            off = torch.cat([z[i, :i], z[i, i + 1:]] + ([extra[i]] if extra is not None else []))
            weights = off.shape[0] * torch.softmax(beta * off, 0)
            out.append(torch.log(alpha * torch.exp(z[i, i]) + (weights * torch.exp(off)).sum()))
        return torch.stack(out)

    zn = s * torch.einsum("nd,nkd->nk", a, negs) if negs is not None else None
    return (-torch.diagonal(z) + 0.5 * log_denominators(z, zn) + 0.5 * log_denominators(z.T)).mean()


def bf16_values(b, d, m, seed):
    """m modalities of unit rows, bf16-rounded, each row correlated with the first modality's
    (positives ~0.4 cosine, as in a trained CLIP), plus [b, 2, d] hard negatives."""
    g = torch.Generator().manual_seed(seed)
    base = F.normalize(torch.randn(b, d, generator=g), dim=-1)
    feats = [base] + [F.normalize(base + 2 * F.normalize(torch.randn(b, d, generator=g), dim=-1), dim=-1)
                      for _ in range(m - 1)]
    negs = F.normalize(base[:, None] + 2 * F.normalize(torch.randn(b, 2, d, generator=g), dim=-1), dim=-1)
    return [f.bfloat16() for f in feats], negs.bfloat16()


CASES = {
    "clip": lambda f, n, s, t, **kw: clip_loss(f[0], f[1], s, **kw),
    "clip_hard_negatives_hn_nce": lambda f, n, s, t, **kw: clip_loss(
        f[0], f[1], s, hard_negatives=n, hard_negative_alpha=0.5, hard_negative_beta=0.3, **kw),
    "siglip": lambda f, n, s, t, **kw: siglip_loss(f[0], f[1], s, t, **kw),
    "siglip_hard_negatives": lambda f, n, s, t, **kw: siglip_loss(f[0], f[1], s, t, hard_negatives=n, **kw),
    "symile_n": lambda f, n, s, t, **kw: symile_loss(f, s, negatives="n", generator=torch.Generator().manual_seed(5),
                                                     **kw),
    "symile_n_squared": lambda f, n, s, t, **kw: symile_loss(f, s, negatives="n_squared", **kw),
}


def evaluate(case, feats, negs, dtype, **kw):
    """Loss and gradients (features, hard negatives, scale, bias) of `case` on the values cast to `dtype`."""
    leaves = [t.to(dtype).clone().requires_grad_() for t in (*feats, negs)]
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    s = torch.tensor(30.0 if case.startswith(("clip", "symile")) else 10.0, dtype=stat, requires_grad=True)
    t = torch.tensor(-10.0, dtype=stat, requires_grad=True)
    loss = CASES[case](leaves[:-1], leaves[-1], s, t, chunk_size=37, **kw)
    loss.backward()
    return loss, [x.grad for x in leaves if x.grad is not None], [x.grad for x in (s, t) if x.grad is not None]


def errors(got, want):
    (loss, grads, scalars), (ref_loss, ref_grads, ref_scalars) = got, want
    return {"loss": abs(loss.double() - ref_loss).item() / abs(ref_loss).item(),
            "cosine": min(F.cosine_similarity(g.double().flatten(), w.flatten(), 0).item()
                          for g, w in zip(grads, ref_grads)),
            "scalars": max([abs(g.double() - w).item() / abs(w).item() for g, w in zip(scalars, ref_scalars)],
                           default=0.0)}
