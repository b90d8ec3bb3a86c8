"""Shared fixtures: where the real datasets live and an isolated cache directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_datasets() -> Path | None:
    """The real data: $ARQ_GYM_DATA, else ../shared/datasets beside the checkout."""
    env = os.environ.get("ARQ_GYM_DATA")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared" / "datasets"]:
        if cand.is_dir():
            return cand
    return None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = shared_datasets()
    if path is None:
        pytest.skip("real datasets not found: set ARQ_GYM_DATA to the shared datasets folder")
    return path


@pytest.fixture()
def isolated_cache(tmp_path, monkeypatch) -> Path:
    """A fresh, empty user cache directory and no ARQ_GYM_DATA for this test."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("ARQ_GYM_CACHE", str(cache))
    monkeypatch.delenv("ARQ_GYM_DATA", raising=False)
    return cache


@pytest.fixture()
def one_torch_thread():
    """One torch thread for the test: on a shared 2-core machine two threads contend with
    other jobs and make small certifications several times slower (measured 8x on LeNet smoke)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
