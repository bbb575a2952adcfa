"""With a process group, each rank's loss is the global loss and its gradients are its share:
feature gradients equal the matching slices of the single-process gradients, and the scale/bias
gradients summed over ranks equal the single-process ones (counted once). All-gather on 2 and 3
gloo ranks, the ring on 2, 3 and 4 with odd blocks; on 2 ranks the bf16 path too, against float64 of
the same bf16 values (the tolerances of test_tiled_losses_bf16)."""

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from helpers.ranks import B, as_float64, assert_equals_one_process, free_port, grads, inputs, leaves, worker

pytestmark = pytest.mark.slow  # starts training processes


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("case", ["clip", "siglip", "symile_n", "symile_n_squared"])
def test_distributed_loss_equals_global_loss(case, world, tmp_path):
    assert_equals_one_process(case, world, tmp_path, "gather", B)


# 7, 5, 3 and 11 rows a rank; tiles (and ring parts) of 5
@pytest.mark.parametrize("world,b", [(2, 14), (3, 15), (4, 12), (3, 33)])
@pytest.mark.parametrize("case", ["clip", "siglip", "symile_n"])
def test_ring_equals_global_loss(case, world, b, tmp_path):
    assert_equals_one_process(case, world, tmp_path, "ring", b)


@pytest.mark.parametrize("case,mode", [(c, "gather") for c in ("clip", "siglip", "symile_n", "symile_n_squared")]
                         + [(c, "ring") for c in ("clip", "siglip", "symile_n")])
def test_distributed_bf16_loss_is_close_to_float64(case, mode, tmp_path):
    world = 2
    mp.spawn(worker, args=(world, free_port(), case, str(tmp_path), torch.bfloat16, mode), nprocs=world)
    ref_loss, ref = grads(case, leaves(as_float64(inputs(torch.bfloat16))), None)
    results = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(world)]

    def joined(key, m=None):  # every rank's rows of one gradient, back in global order
        return torch.cat([(res["g"][key] if m is None else res["g"][key][m]).double() for res in results])

    cosine = lambda got, want: F.cosine_similarity(got.flatten(), want.flatten(), 0).item()
    for res in results:
        assert abs(res["loss"].double() - ref_loss).item() <= 3e-3 * abs(ref_loss).item()
    for m, want in enumerate(ref["f"]):
        if want is not None:
            assert results[0]["g"]["f"][m].dtype == torch.bfloat16 and cosine(joined("f", m), want) >= 0.9999
    if ref["negs"] is not None:
        assert cosine(joined("negs"), ref["negs"]) >= 0.9999
    for key in ("scale", "bias"):
        if ref[key] is not None:
            got = sum(res["g"][key].double() for res in results)
            assert abs(got - ref[key]).item() <= 1e-2 * abs(ref[key]).item()
