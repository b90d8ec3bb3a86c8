"""Confidence bounds against scipy's exact Clopper-Pearson interval, and the Certificate."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import binomtest

from arq_gym.smoothing import (
    Certificate,
    lower_confidence_bound,
    radius_from_bound,
    radius_key,
    upper_confidence_bound,
)


@pytest.mark.parametrize("n", [1, 2, 10, 97, 1000])
@pytest.mark.parametrize("alpha", [0.001, 0.01, 0.05])
def test_bounds_match_scipy_exact_interval(n, alpha):
    ks = sorted({0, 1, n // 3, n // 2, n - 1, n} & set(range(n + 1)))
    lows = lower_confidence_bound(np.array(ks), n, alpha)
    highs = upper_confidence_bound(np.array(ks), n, alpha)
    for k, lo, hi in zip(ks, lows, highs):
        ci = binomtest(k, n).proportion_ci(confidence_level=1 - 2 * alpha, method="exact")
        assert lo == pytest.approx(ci.low, abs=1e-10)
        assert hi == pytest.approx(ci.high, abs=1e-10)
        # scalar calls agree with the vectorised ones
        assert lower_confidence_bound(k, n, alpha) == pytest.approx(lo, abs=1e-15)
    assert lows[0] == 0.0 and highs[-1] == 1.0


def test_bound_edge_values_closed_form():
    n, alpha = 500, 0.001
    # k = n: lower bound alpha^(1/n); k = 0: upper bound 1 - alpha^(1/n)
    assert lower_confidence_bound(n, n, alpha) == pytest.approx(alpha ** (1 / n), rel=1e-12)
    assert upper_confidence_bound(0, n, alpha) == pytest.approx(1 - alpha ** (1 / n), rel=1e-12)


@pytest.mark.parametrize(
    "k,n,alpha", [(-1, 10, 0.01), (11, 10, 0.01), (1, 0, 0.01), (1, 10, 0.0), (1, 10, 1.0)]
)
def test_bounds_reject_bad_input(k, n, alpha):
    with pytest.raises(ValueError):
        lower_confidence_bound(k, n, alpha)


def test_radius_from_bound():
    r = radius_from_bound(np.array([0.3, 0.5, 0.8413447460685429]), 0.5)
    assert r[0] == 0.0 and r[1] == 0.0
    assert r[2] == pytest.approx(0.5, rel=1e-9)


def _cert():
    return Certificate(
        idx=[0, 20, 40, 60],
        label=[1, 2, 3, 4],
        predict=[1, 2, -1, 0],
        radius=[0.3, 1.0, 0.0, 0.7],
        correct=[True, True, False, False],
        pa_lower=[0.7, 0.98, 0.4, 0.9],
        zeta=[np.nan] * 4,
        sigma=0.5,
        alpha=0.001,
        forward_passes=400,
        seconds=2.0,
        time=[0.5] * 4,
    )


def test_certificate_metrics():
    c = _cert()
    assert c.clean_accuracy == 0.5
    assert c.acr == pytest.approx((0.3 + 1.0) / 4)
    assert c.abstain_rate == 0.25
    assert c.certified_accuracy(0.0) == 0.5
    assert c.certified_accuracy(0.5) == 0.25
    assert c.certified_accuracy(1.5) == 0.0
    s = c.summary(radii=(0.0, 0.25, 1.0))
    assert set(s) == {
        "images",
        "clean_accuracy",
        "certified_accuracy",
        "acr",
        "abstain_rate",
        "forward_passes",
        "seconds",
    }
    assert s["certified_accuracy"] == {"0.0": 0.5, "0.25": 0.5, "1.0": 0.25}
    assert radius_key(0.25) == "0.25" and radius_key(1) == "1.0"
    assert s["images"] == 4 and s["forward_passes"] == 400


def test_certificate_tsv_and_json(tmp_path):
    c = _cert()
    c.to_tsv(tmp_path / "c.tsv")
    lines = (tmp_path / "c.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["idx", "label", "predict", "radius", "correct", "time"]
    assert lines[2].split("\t")[:5] == ["20", "2", "2", "1.0000", "1"]
    assert lines[3].split("\t")[2] == "-1"
    assert len(lines) == 5
    data = json.loads(c.to_json(tmp_path / "c.json", model="x"))
    assert data["model"] == "x" and data["acr"] == pytest.approx(c.acr)
    assert json.loads((tmp_path / "c.json").read_text()) == data
    back = Certificate.from_tsv(tmp_path / "c.tsv", sigma=c.sigma)
    for name in ("idx", "label", "predict", "correct"):
        assert np.array_equal(getattr(back, name), getattr(c, name))
    assert np.allclose(back.radius, c.radius, atol=5e-5) and np.allclose(back.time, c.time)
    assert back.acr == pytest.approx(c.acr, abs=5e-5) and back.sigma == c.sigma
    (tmp_path / "bad.tsv").write_text("idx\tradius\n0\t0.5\n")
    with pytest.raises(ValueError, match="not a certificate table"):
        Certificate.from_tsv(tmp_path / "bad.tsv")


def test_certificate_rejects_ragged_arrays():
    with pytest.raises(ValueError, match="radius"):
        Certificate(
            idx=[0, 1],
            label=[0, 1],
            predict=[0, 1],
            radius=[0.1],
            correct=[1, 1],
            pa_lower=[0.6, 0.6],
            zeta=[0, 0],
            sigma=0.25,
            alpha=0.001,
            forward_passes=0,
            seconds=0,
        )
