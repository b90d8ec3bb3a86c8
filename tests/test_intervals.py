"""Sampling intervals of certificates (bootstrap over the certified images)."""

from __future__ import annotations

import numpy as np
import pytest

from arq_gym.smoothing import Certificate, bootstrap_interval, paired_acr_difference


def _cert(n: int, shift: float = 0.0, seed: int = 0) -> Certificate:
    rng = np.random.default_rng(seed)
    correct = rng.random(n) < 0.7
    radius = np.clip(rng.normal(0.4 + shift, 0.2, n), 0, None)
    return Certificate(idx=np.arange(n), label=np.zeros(n), predict=np.where(correct, 0, 1),
                       radius=radius, correct=correct, pa_lower=np.ones(n),
                       zeta=np.full(n, np.nan), sigma=0.25, alpha=0.001, forward_passes=0,
                       seconds=0.0)  # fmt: skip


def test_acr_interval_brackets_the_acr_and_shrinks_with_images():
    small, large = _cert(100), _cert(2000)
    lo_s, hi_s = small.acr_interval()
    lo_l, hi_l = large.acr_interval()
    assert lo_s < small.acr < hi_s and lo_l < large.acr < hi_l
    # the width of a mean's interval falls like 1/sqrt(images): 20x the images, ~1/4.5 the width
    assert 3.0 < (hi_s - lo_s) / (hi_l - lo_l) < 6.5
    assert small.acr_interval() == small.acr_interval()  # seeded


def test_bootstrap_interval_of_constant_values_is_the_value():
    assert bootstrap_interval(np.full(10, 0.5)) == (0.5, 0.5)


def test_paired_difference_detects_a_shift_and_not_noise():
    base = _cert(500)
    same = paired_acr_difference(base, base)
    assert same["difference"] == 0 and not same["significant"]
    shifted = _cert(500)
    shifted.radius = shifted.radius + 0.05
    res = paired_acr_difference(shifted, base)
    assert res["significant"] and res["low"] > 0
    assert res["difference"] == pytest.approx(shifted.acr - base.acr)
    with pytest.raises(ValueError, match="same images"):
        paired_acr_difference(_cert(400), base)
