"""``fastconv._cli.malloc``: freed activations stay in the heap, so a training step's arrays do not
page-fault in again (run in a subprocess: the setting is process-wide)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

STEPS = """
import resource, sys
import numpy as np
from fastconv._cli import malloc as _malloc
if sys.argv[1] == "on":
    assert _malloc.keep_freed_memory()
def step():  # two 9.4 MB arrays, as a conv layer's output and its ReLU
    a = np.ones((64, 64, 24, 24), np.float32)
    return float((a * 2)[0, 0, 0, 0])
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def _faults_per_step(mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # glibc defaults
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True,
                         check=True, timeout=120, env=env).stdout
    return float(out.strip())


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="mallopt thresholds are a glibc feature")
def test_kept_memory_stops_the_page_faults_of_repeated_large_arrays():
    without = _faults_per_step("off")
    with_kept = _faults_per_step("on")
    assert without > 500  # the default: ~2 x 9.4 MB faulted in again every step
    assert with_kept < 20
