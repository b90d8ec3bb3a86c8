"""Certification by randomized smoothing (Cohen et al. 2019) and incremental randomized
smoothing (Ugare et al. 2024).

- :class:`NoiseSource`: seeded Gaussian noise, identical whatever the batch size.
- :func:`certify`, :func:`predict`: CERTIFY and PREDICT for any torch classifier;
  :func:`certify_chunked`: the same, saved chunk by chunk so that a long run can resume.
- :func:`lower_confidence_bound`, :func:`upper_confidence_bound`: exact one-sided
  Clopper-Pearson bounds (scipy).
- :class:`IRSCache`, :func:`build_irs_cache`, :func:`load_or_build_irs_cache`,
  :func:`certify_incremental`: certify a modified (quantized) network cheaply by reusing the
  certification of the original.
- :class:`Certificate`: per-image results and summary metrics (ACR, certified accuracy, ...).
- :func:`evenly_spaced`: the image subset convention (every ``len // k``-th image).
"""

from __future__ import annotations

import numpy as np

from arq_gym.smoothing.bounds import lower_confidence_bound, upper_confidence_bound
from arq_gym.smoothing.certificate import (
    DEFAULT_RADII,
    Certificate,
    bootstrap_interval,
    paired_acr_difference,
    radius_key,
)
from arq_gym.smoothing.certify import certify, predict, radius_from_bound, resolve_device
from arq_gym.smoothing.chunked import certify_chunked
from arq_gym.smoothing.incremental import (
    CACHE_FORMAT,
    IRSCache,
    build_irs_cache,
    certify_incremental,
    find_irs_cache,
    images_sha256,
    load_or_build_irs_cache,
    read_cache_meta,
)
from arq_gym.smoothing.noise import NoiseSource


def evenly_spaced(total: int, k: int) -> np.ndarray:
    """Indices of ``k`` images taken every ``total // k``-th from a split of ``total`` images
    (Cohen et al.: 500 of the 10,000 CIFAR-10 test images = every 20th, starting at 0)."""
    total, k = int(total), int(k)
    if not 1 <= k <= total:
        raise ValueError(f"the number of images must be in [1, {total}], got {k}")
    return np.arange(k, dtype=np.int64) * (total // k)


__all__ = [
    "CACHE_FORMAT",
    "DEFAULT_RADII",
    "Certificate",
    "IRSCache",
    "NoiseSource",
    "bootstrap_interval",
    "build_irs_cache",
    "certify",
    "certify_chunked",
    "certify_incremental",
    "evenly_spaced",
    "find_irs_cache",
    "images_sha256",
    "load_or_build_irs_cache",
    "lower_confidence_bound",
    "paired_acr_difference",
    "predict",
    "radius_from_bound",
    "radius_key",
    "read_cache_meta",
    "resolve_device",
    "upper_confidence_bound",
]
