"""Shared fixtures: where the real datasets live and an isolated cache directory."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATASETS = ("cifar10", "fashion_mnist")


def _find_data() -> tuple[Path | None, str | None]:
    """Where the package itself would read the datasets from (``ARQ_GYM_DATA``, then the user
    cache folder that ``arq-gym data --download`` fills; see :func:`arq_gym.data.data_roots`):
    the first of those folders holding every dataset, and the error of a set but missing
    ``ARQ_GYM_DATA``. Never downloads."""
    from arq_gym.data import DataError, data_roots, find_root

    try:
        roots = data_roots()
    except DataError as exc:
        return None, str(exc)
    for root in roots:
        if root.is_dir() and all(find_root(name, root) for name in DATASETS):
            return root, None
    return None, None


# resolved once, at import: fixtures such as isolated_cache change the environment later
_DATA, _DATA_ERROR = _find_data()


def shared_datasets() -> Path | None:
    """The folder holding the real datasets, found as the package finds them, or None."""
    return _DATA


def pytest_configure(config) -> None:
    if _DATA_ERROR:  # a typo in ARQ_GYM_DATA is said once, not hidden behind skipped tests
        raise pytest.UsageError(_DATA_ERROR)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if _DATA is None:
        pytest.skip("real datasets not found: set ARQ_GYM_DATA=/path/to/datasets or run "
                    "`arq-gym data --download`")  # fmt: skip
    return _DATA


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
