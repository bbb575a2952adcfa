"""train.compile (pipeline/train/compile.py): compiled forwards train as the eager model does, GradCache's
no-grad encode and re-encode included, and evaluation stays eager. Built by aot_eager here (dynamo's graphs,
AOTAutograd's backward, the same kernels as eager); tests/integration/test_train.py trains through inductor."""
import pytest
import torch
from torch._dynamo.utils import counters

from helpers.gradcache import assert_gradcache_matches_full_batch, clip_reference_loss, gradcache_batch, tiny_model
from pipeline.compiled import Compiled
from pipeline.losses import clip_loss
from pipeline.train.gradcache import grad_cache_step

MASKED = {**gradcache_batch(), "mask": {"image": torch.tensor([True, False] * 5)}}  # half the images missing


def train(model, steps=3):
    """Losses of a few AdamW steps on one batch: each step must see the weights the last one updated."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(42)
    losses = []
    for _ in range(steps):
        losses.append(grad_cache_step(model, clip_reference_loss, lambda s: s.backward(), MASKED, 10).item())
        optimizer.step()
        optimizer.zero_grad()
    return losses


@pytest.mark.parametrize("mode", ["model", "step"])
def test_compiled_training_steps_give_the_eager_losses_and_eval_stays_eager(mode):
    eager = train(tiny_model())
    torch._dynamo.reset()  # compiled anew here, whatever ran before in this process
    graphs = counters["stats"]["unique_graphs"]
    model = tiny_model(mode)
    compiled = train(model)
    assert compiled == pytest.approx(eager, rel=1e-6) and eager[-1] < eager[0] - 0.1, (compiled, eager)
    assert counters["stats"]["unique_graphs"] > graphs and Compiled.broken is None  # really compiled
    graphs = counters["stats"]["unique_graphs"]
    model.eval()
    with torch.no_grad():
        model(gradcache_batch(7))  # another batch size: a compile if evaluation were compiled
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("mode", ["model", "step"])
def test_gradcache_with_compiled_forwards_matches_full_batch_backward(mode):
    """Chunks of 3 of 10 rows with 2 hard-negative captions each: a no-grad and a grad graph per shape, patch
    dropout replayed from the saved RNG state by the compiled graphs too, the missing-image embedding's
    gradient through the compiled mask."""
    def loss_fn(f):
        return clip_loss(f["image"], f["text"], f["logit_scale"], hard_negatives=f["text_neg"], hard_negative_alpha=0.5)

    batch = {**MASKED, "text_neg": torch.randint(1, 100, (10, 2, 8), generator=torch.Generator().manual_seed(2))}
    torch._dynamo.reset()
    graphs = counters["stats"]["unique_graphs"]
    assert_gradcache_matches_full_batch(batch, 3, loss_fn, compile=mode)
    new = counters["stats"]["unique_graphs"] - graphs
    assert new > 0 and Compiled.broken is None
    if mode == "model":  # 12 variants of Tower.forward (rows 3, 1 and negatives' 6, 2; grad or not): all compiled
        assert new > 8, new  # above dynamo's default recompile_limit, which would leave the rest eager
