"""Mined/mixed hard negatives equal a naive float64 full-matrix version: the top-k, the MoCHi mixtures
(given the same draws) and the clip/siglip losses and gradients with them, alone and over 2 gloo ranks."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from open_clip.loss import SigLipLoss
from test_tiled_losses import naive_hn_nce
from test_tiled_losses_distributed import free_port

from pipeline.losses import clip_loss, siglip_loss
from pipeline.losses.objectives.mined_negatives import MinedNegatives, MixingDraws
from pipeline.losses.tiles import TileSpec, top_k_negatives

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


def worker(rank, world, port, out_dir, ring):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = slice(rank * N // world, (rank + 1) * N // world)
    a, b = (f[rows] for f in features(3))
    _, top = top_k_negatives(a, b if ring else features(3)[1], K,
                             TileSpec.resolve(a.device, 5, distributed="ring" if ring else "gather", group=dist.group.WORLD))
    negs = MinedNegatives(top_k=K, mixed=S, mix_with_anchor=S2, chunk_size=5, group=dist.group.WORLD,
                          distributed="ring" if ring else "gather")(a, b, step=4, generator=torch.Generator().manual_seed(4))
    x = leaves(a, b)
    out = {}
    for kind, loss in mined_losses(*x, negs, dist.group.WORLD).items():
        grads = torch.autograd.grad(loss, x[:3])
        out[kind] = {"loss": loss.detach(), "grads": grads}
    torch.save({"top": top, "negs": negs, "losses": out}, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world,ring", [(2, False), (3, True)])  # the losses ring too from 3 ranks on ("auto")
def test_ranks_mine_the_global_batch(world, ring, tmp_path):
    mp.spawn(worker, args=(world, free_port(), str(tmp_path), ring), nprocs=world)
    a, b = features(3)
    top, negs = naive_negatives(a, b, draws(4))
    y = leaves(a, b)
    refs = naive_losses(*y, negs)
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(world)]
    for r, got in enumerate(ranks):
        rows = slice(r * N // world, (r + 1) * N // world)
        assert torch.equal(got["top"], top[rows])  # global column indices
        torch.testing.assert_close(got["negs"], negs[rows], rtol=1e-12, atol=1e-14)
        for kind, ref in refs.items():
            torch.testing.assert_close(got["losses"][kind]["loss"], ref.detach(), rtol=1e-10, atol=1e-12)
            want = torch.autograd.grad(ref, y[:3], retain_graph=True)
            for g, w in zip(got["losses"][kind]["grads"][:2], want[:2]):
                torch.testing.assert_close(g, w[rows], rtol=1e-9, atol=1e-12)
    for kind, ref in refs.items():  # the scale: each rank's share, summed = the whole gradient
        scale_grad, = torch.autograd.grad(ref, [y[2]], retain_graph=True)
        torch.testing.assert_close(sum(got["losses"][kind]["grads"][2] for got in ranks), scale_grad, rtol=1e-9,
                                   atol=1e-12)
