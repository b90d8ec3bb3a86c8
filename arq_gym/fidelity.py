"""Fidelity presets: how many images and noise samples a search evaluates each candidate with.

A fidelity fixes the evaluation subset (split and number of images) and the sample sizes of the
two certifications a search runs: the one-time certification of the FP32 network (``n0``, ``n``,
``alpha``), kept in an IRS cache, and the incremental certification of every candidate
(``n_p``, ``alpha_zeta``, ``gamma``; see background.md section 2).

=======  ===========================  =========  =======  =====================
name     images                       n          n_p      use
=======  ===========================  =========  =======  =====================
smoke    16 validation images         1,000      100      tests, CI, check_env
search   100 validation images        10,000     500      the default search
paper    500 test images (every 20th) 100,000    10,000   final tables, GPU
=======  ===========================  =========  =======  =====================

All presets use ``n0 = 100``, ``alpha = alpha_zeta = 0.001`` and ``gamma = 0.99``. The subset is
deterministic: ``images`` evenly spaced indices of the split (index ``i * (len(split) // images)``),
so the test preset takes every 20th of the 10,000 test images. The data splits are class-major
(see :mod:`arq_gym.data`), so evenly spaced indices cover every class equally.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

__all__ = ["FIDELITIES", "Fidelity", "get_fidelity"]


@dataclass(frozen=True)
class Fidelity:
    """Sample sizes and evaluation subset of a search (see the module docstring)."""

    name: str
    images: int
    n: int
    n_p: int
    n0: int = 100
    alpha: float = 0.001
    alpha_zeta: float = 0.001
    gamma: float = 0.99
    split: str = "val"

    def __post_init__(self) -> None:
        for field in ("images", "n", "n_p", "n0"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"fidelity {field} must be a positive integer, got {value!r}")
        if self.n_p > self.n:
            raise ValueError(
                f"fidelity n_p ({self.n_p}) must not exceed n ({self.n}): incremental "
                "certification reuses the first n_p noise samples of the FP certification"
            )
        for field in ("alpha", "alpha_zeta"):
            value = getattr(self, field)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 < value < 0.5):
                raise ValueError(f"fidelity {field} must be in (0, 0.5), got {value!r}")
        if not (0.5 < self.gamma <= 1.0):
            raise ValueError(f"fidelity gamma must be in (0.5, 1], got {self.gamma!r}")
        if self.split not in ("val", "test"):
            raise ValueError(f"fidelity split must be 'val' or 'test', got {self.split!r}")

    @property
    def is_preset(self) -> bool:
        """True when this is exactly one of the named presets (no overrides)."""
        return FIDELITIES.get(self.name) == self

    @property
    def key(self) -> str:
        """A short file-name-safe identifier: the preset name, or name plus the overrides."""
        if self.is_preset:
            return self.name
        base = FIDELITIES.get(self.name)
        parts = [self.name]
        for f in dataclasses.fields(self):
            if f.name == "name":
                continue
            value = getattr(self, f.name)
            if base is None or getattr(base, f.name) != value:
                parts.append(f"{f.name}{value}")
        return "-".join(parts)

    def with_overrides(
        self,
        images: int | None = None,
        n: int | None = None,
        n_p: int | None = None,
        alpha: float | None = None,
    ) -> Fidelity:
        """A copy with the given fields replaced (``None`` keeps the preset's value)."""
        changes = {
            k: v for k, v in (("images", images), ("n", n), ("n_p", n_p), ("alpha", alpha))
            if v is not None
        }  # fmt: skip
        return dataclasses.replace(self, **changes) if changes else self

    def subset_indices(self, available: int) -> np.ndarray:
        """``images`` evenly spaced indices into a split of ``available`` images."""
        if self.images > available:
            raise ValueError(
                f"fidelity {self.name!r} asks for {self.images} images but the {self.split} "
                f"split has only {available}"
            )
        return np.arange(self.images, dtype=np.int64) * (available // self.images)

    def to_dict(self) -> dict:
        """All fields as a JSON-friendly dict."""
        return dataclasses.asdict(self)


FIDELITIES: dict[str, Fidelity] = {
    "smoke": Fidelity("smoke", images=16, n=1_000, n_p=100),
    "search": Fidelity("search", images=100, n=10_000, n_p=500),
    "paper": Fidelity("paper", images=500, n=100_000, n_p=10_000, split="test"),
}


def get_fidelity(
    fidelity: str | Fidelity = "search",
    *,
    images: int | None = None,
    n: int | None = None,
    n_p: int | None = None,
    alpha: float | None = None,
) -> Fidelity:
    """A preset by name (or a :class:`Fidelity`), with explicit overrides applied."""
    if isinstance(fidelity, Fidelity):
        base = fidelity
    elif isinstance(fidelity, str) and fidelity in FIDELITIES:
        base = FIDELITIES[fidelity]
    else:
        raise ValueError(f"unknown fidelity {fidelity!r}; choose one of {', '.join(FIDELITIES)}")
    return base.with_overrides(images=images, n=n, n_p=n_p, alpha=alpha)
