"""With keep_freed_memory, a training step reuses the previous step's memory instead of faulting it in again."""
import subprocess
import sys
from pathlib import Path

STEPS = """
import resource, sys, torch
from pipeline.train.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()  # glibc, as on every Linux CI machine
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(4)])
opt = torch.optim.AdamW(model.parameters())
x = torch.randn(512, 1024)
def step():
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()  # frees the gradients, as every trainer does between steps
step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 10)
"""


def faults_per_step(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1])
    return int(out.stdout)


def test_a_step_reuses_freed_memory_instead_of_faulting_it_in():
    default, kept = faults_per_step("default"), faults_per_step("keep")
    assert kept <= 50, kept  # 0 here: every block comes back from the heap
    assert default >= 20 * (kept + 50), default  # 3,500-7,000 here: glibc gave pages back and faults them in again
