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
    # 16 x 6.4 MB: more than glibc's largest default trim threshold (64 MB) is freed at once,
    # so by default the pages go back to the system whatever the allocation history was
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
    # the default: every batch maps fresh pages (thousands of faults per batch of 102 MB)
    default_applied, default_faults = _faults(ARQ_GYM_MALLOC="default")
    assert not default_applied and default_faults > 10 * 1000
    assert faults < default_faults / 100


def test_user_malloc_settings_are_respected():
    applied, _ = _faults(MALLOC_MMAP_THRESHOLD_="131072")
    assert not applied
