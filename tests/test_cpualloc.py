"""ft.core.cpualloc: after `keep_freed_memory`, a step that frees and reallocates the same large
activations does not fault its memory in again (checked in fresh processes)."""

import subprocess
import sys

import pytest

PATTERN = """
import resource, sys, torch
from ft.core.cpualloc import keep_freed_memory
if sys.argv[1] == "tuned":
    assert keep_freed_memory()
def step():
    acts = [torch.ones(1 << 20) for _ in range(30)]  # 30 activations of 4 MB, written
    del acts
step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def faults_per_step(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PATTERN, mode], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_freed_activations_stay_in_the_heap():
    # A step writes 30 x 4 MB = 30,720 pages. glibc's defaults give most of them back on free
    # and fault 6,000-30,000 in again every step (on this machine); once tuned, at most a chunk
    # that landed outside the heap (address-space layout) is faulted in again: 0 or 1,024.
    pages = 30 * (4 << 20) // 4096
    tuned = faults_per_step("tuned")
    assert tuned < 0.05 * pages, f"{tuned} page faults per step after keep_freed_memory()"
