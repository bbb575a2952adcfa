"""The global contrastive loss written out naively in float64, and the stateful steps its tests compare."""
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.losses import loss_config
from pipeline.losses.objectives.global_clip import GlobalClip

N, D, M = 12, 6, 30  # global batch, feature dim, dataset size
GAMMA, RHO = 0.3, 0.5


def unit(*shape, seed, dtype=torch.float64):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype), dim=-1)


def naive(a, b, s_img, s_txt, u_img, u_txt, gamma, rho):
    """Objective value, surrogate (its gradient is the estimator) and new u, on the whole B×B matrix."""
    z = a @ b.T
    off = ~torch.eye(z.shape[0], dtype=torch.bool)
    value, surrogate, new_u = 0.0, 0.0, []
    for logits, scale, u in ((s_img[:, None] * z, s_img, u_img), (s_txt[:, None] * z.T, s_txt, u_txt)):
        g = (torch.exp(logits - torch.diagonal(logits)[:, None]) * off).sum(1) / (z.shape[0] - 1)
        u = torch.where(torch.isnan(u), g, (1 - gamma) * u + gamma * g).detach()
        tau = 1 / scale
        value = value + 0.5 * (tau * (torch.log(g) + rho)).mean()
        surrogate = surrogate + 0.5 * (tau.detach() * g / u + tau * (torch.log(u) + rho)).mean()
        new_u.append(u)
    return value, surrogate, new_u


def expand(s, n=N):
    return s.expand(n) if s.dim() == 0 else s


def batches():
    """Two steps' global batches: features and (non-contiguous, overlapping) dataset indices."""
    perm = torch.randperm(M, generator=torch.Generator().manual_seed(8))
    return [(unit(N, D, seed=10 + t), unit(N, D, seed=20 + t), perm[t * 8: t * 8 + N]) for t in range(2)]


def run_steps(individual: bool, rows: slice, group, distributed: str = "gather") -> dict:
    """Two steps of global_clip on this rank's rows; the first step is committed, the second both
    computed and committed; also an uncommitted third call, which must leave the tables alone."""
    gcl = global_clip(individual, group, gamma=GAMMA, rho=RHO, tau_init=0.1, chunk_size=5, distributed=distributed)
    scale = torch.tensor(12.0, dtype=torch.float64, requires_grad=True)
    out = {}
    for step, (a, b, idx) in enumerate(batches()):
        a, b = a[rows].clone().requires_grad_(), b[rows].clone().requires_grad_()
        loss = gcl.anchor_loss(a, b, scale, idx[rows], step)
        scale.grad = None
        for p in gcl.extra_parameters():
            p.grad = None
        loss.backward()
        gcl.commit()
        out[step] = {"loss": loss.detach(), "a": a.grad, "b": b.grad, "scale": scale.grad}
        if individual:
            dense = gcl.tau.values.grad.to_dense()
            out[step]["tau"] = torch.zeros(M, 2, dtype=torch.float64).index_put_(
                (gcl.tau.shard_indices(),), dense)
    if individual:  # distinct per sample, so that restoring them is seen
        gcl.tau.values.data[:] = (0.1 + 1e-3 * gcl.tau.shard_indices())[:, None]
    a, b, idx = batches()[0]
    gcl.anchor_loss(a[rows], b[rows], scale, idx[rows], 5)  # not committed
    return out, gcl


def naive_steps(individual: bool) -> dict:
    """The same two steps on the full matrix with dense per-sample tables."""
    u = torch.full((M, 2), float("nan"), dtype=torch.float64)
    tau = torch.full((M, 2), 0.1, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(12.0, dtype=torch.float64, requires_grad=True)
    out = {}
    for step, (a, b, idx) in enumerate(batches()):
        a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
        s_img, s_txt = (1 / tau[idx, 0], 1 / tau[idx, 1]) if individual else (scale.expand(N), scale.expand(N))
        value, surrogate, new_u = naive(a, b, s_img, s_txt, u[idx, 0], u[idx, 1], GAMMA, RHO)
        leaves = [a, b, tau if individual else scale]
        ga, gb, gt = torch.autograd.grad(surrogate, leaves)
        out[step] = {"loss": value.detach(), "a": ga, "b": gb, ("tau" if individual else "scale"): gt}
        u[idx] = torch.stack(new_u, 1)
    out["u"] = u.log()
    return out


def compare(got: dict, want: dict, rows: slice, individual: bool) -> None:
    for step in (0, 1):
        torch.testing.assert_close(got[step]["loss"], want[step]["loss"], rtol=1e-12, atol=1e-12)
        for key in ("a", "b"):
            torch.testing.assert_close(got[step][key], want[step][key][rows], rtol=1e-10, atol=1e-12)


def global_clip(individual: bool, group=None, **options) -> GlobalClip:
    """The registered loss over M samples with float64 tables; per-sample temperatures step at lr 0.05."""
    cfg = loss_config("global_clip", temperature="individual" if individual else "global",
                      temperature_lr=0.05 if individual else None, **options)
    return GlobalClip(cfg, group=group, num_samples=M, dtype=torch.float64)


def save(gcl: GlobalClip, directory, rank: int = 0) -> None:
    """One file per rank, as a checkpoint keeps them."""
    torch.save(gcl.state_dict(), Path(directory) / f"rank{rank}_state.pt")


def reloaded(directory, individual: bool, group=None) -> GlobalClip:
    """A fresh loss in this world, loaded from the files another world saved."""
    gcl = global_clip(individual, group)
    gcl.load_states([torch.load(f, weights_only=True) for f in sorted(Path(directory).glob("rank*_state.pt"))])
    return gcl
