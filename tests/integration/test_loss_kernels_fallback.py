"""Where inductor cannot build (no C++ compiler), the losses print one warning and run eagerly with the same
results: checked in fresh interpreters with CXX=/bin/false and a cold inductor cache."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

CHUNK = 256  # one full fused tile and edges at 600 rows


def test_without_a_compiler_the_losses_run_eagerly_after_one_warning(tmp_path):
    script = textwrap.dedent(f"""
        import json, torch, torch.nn.functional as F
        from pipeline.losses import clip_loss, siglip_loss
        g = torch.Generator().manual_seed(0)
        a, b = (F.normalize(torch.randn(600, 48, generator=g), dim=-1).requires_grad_() for _ in range(2))
        s, t = torch.tensor(30.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
        values = [clip_loss(a, b, s, chunk_size={CHUNK}), siglip_loss(a, b, s, t, chunk_size={CHUNK})]
        sum(values).backward()
        print(json.dumps([v.item() for v in values] + [s.grad.item(), t.grad.item(), a.grad.norm().item()]))
    """)
    env = dict(os.environ, CXX="/bin/false", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    run = lambda e: subprocess.run([sys.executable, "-c", script], env=e, capture_output=True, text=True,  # noqa: E731
                                   timeout=300)
    broken, fine = run(env), run(dict(os.environ))
    assert broken.returncode == 0 == fine.returncode, broken.stderr[-2000:] + fine.stderr[-2000:]
    warnings = [line for line in broken.stderr.splitlines() if "torch.compile is off" in line]
    assert len(warnings) == 1 and "C++ compiler" in warnings[0], broken.stderr[-2000:]
    assert "torch.compile is off" not in fine.stderr
    got, want = (json.loads(r.stdout.strip().splitlines()[-1]) for r in (broken, fine))
    assert got == pytest.approx(want, rel=1e-5)
