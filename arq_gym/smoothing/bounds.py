"""One-sided exact (Clopper-Pearson) confidence bounds of a binomial proportion, from scipy.

``lower_confidence_bound(k, n, alpha)`` is the lower end of the two-sided exact interval at
level ``1 - 2 alpha`` (what Cohen et al. use): ``P(p >= bound) >= 1 - alpha``. It is
``scipy.stats.beta.ppf(alpha, k, n - k + 1)``, and 0 when ``k == 0``. The upper bound is the
mirror image, ``beta.ppf(1 - alpha, k + 1, n - k)``, and 1 when ``k == n``. Both accept scalars
or arrays (vectorised over images).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import beta


def _check(k, n, alpha):
    k = np.asarray(k, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    alpha = float(alpha)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if np.any(n < 1) or np.any(k < 0) or np.any(k > n):
        raise ValueError("need 0 <= k <= n and n >= 1")
    return k, n, alpha


def _out(x):
    x = np.asarray(x, dtype=np.float64)
    return float(x) if x.ndim == 0 else x


def lower_confidence_bound(k, n, alpha: float):
    """One-sided ``(1 - alpha)`` Clopper-Pearson lower bound of ``k / n`` (scalar or array)."""
    k, n, alpha = _check(k, n, alpha)
    with np.errstate(invalid="ignore"):
        low = beta.ppf(alpha, k, n - k + 1)
    return _out(np.where(k == 0, 0.0, low))


def upper_confidence_bound(k, n, alpha: float):
    """One-sided ``(1 - alpha)`` Clopper-Pearson upper bound of ``k / n`` (scalar or array)."""
    k, n, alpha = _check(k, n, alpha)
    with np.errstate(invalid="ignore"):
        high = beta.ppf(1.0 - alpha, k + 1, n - k)
    return _out(np.where(k == n, 1.0, high))
