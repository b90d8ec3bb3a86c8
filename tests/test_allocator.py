"""arq_gym.allocator: activation-sized blocks stay mapped between forward passes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import resource, torch
from arq_gym.allocator import keep_activation_memory
ok = keep_activation_memory()
def batch():  # like a forward pass: many activation-sized blocks alive at once, then freed
    blocks = [torch.ones(1_600_000) for _ in range(16)]
    del blocks
for _ in range(3):
    batch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    batch()
print(ok, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(**env) -> tuple[bool, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "ARQ_GYM_MALLOC"))}
    out = subprocess.run([sys.executable, "-c", PROBE], env=clean | env, capture_output=True,
                         text=True, check=True).stdout.split()  # fmt: skip
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_activation_blocks_are_reused_without_page_faults():
    applied, faults = _faults()
    if not applied:
        pytest.skip("no glibc mallopt here")
    # the reference: every block mmapped afresh, as glibc does below its mmap threshold. (Its
    # default is a dynamic threshold whose state depends on the process's allocation history,
    # so the default alone is not a reproducible baseline: it faulted in one CI run, not in
    # another.) Thousands of faults per batch of 102 MB.
    base_applied, base_faults = _faults(MALLOC_MMAP_THRESHOLD_="131072")
    assert not base_applied and base_faults > 10 * 1000
    assert faults < base_faults / 100


def test_user_malloc_settings_are_respected():
    applied, _ = _faults(MALLOC_MMAP_THRESHOLD_="131072")
    assert not applied
