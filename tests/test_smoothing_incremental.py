"""Incremental randomized smoothing: soundness against a modified linear classifier whose
disagreement probability is known in closed form, the branches, and the cache's validity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import norm
from test_smoothing_certify import LinearBinary, linear_trials, one_thread  # noqa: F401

from arq_gym.smoothing import (
    IRSCache,
    build_irs_cache,
    certify_incremental,
    find_irs_cache,
    load_or_build_irs_cache,
)

SIGMA = 0.5


def _cache(model, x, labels, **kw):
    args = {
        "n0": 50,
        "n": 400,
        "alpha": 0.001,
        "n_p_max": 200,
        "batch_size": 20_000,
        "progress": False,
        "checkpoint_sha256": "ckpt-a",
        "data_sha256": "data-a",
    } | kw
    return build_irs_cache(model, x, labels, SIGMA, **args)


@pytest.fixture(scope="module")
def small():
    model, w, b, x, labels, exact = linear_trials(12, 4, SIGMA, 2 * SIGMA, seed=11)
    return model, w, b, x, labels, _cache(model, x, labels)


def test_incremental_sound_on_shifted_linear_classifier():
    """2,000 trials: f(x) = [w.x + b > 0] cached, f'(x) = [w.x + b' > 0] certified with IRS.
    f' smoothed equals f', exact radius |w.x + b'| / ||w||; P(f != f') at x is
    |Phi(s / (sigma ||w||)) - Phi(s' / (sigma ||w||))|. The certificate may be wrong in at most
    0.5% of trials (alpha + alpha_zeta = 0.002), and zeta may undercut the true disagreement
    probability in at most 0.5%."""
    failures = zeta_misses = zeta_used = plain_used = total = 0
    for seed in (0, 1):
        model, w, b, x, labels, _exact = linear_trials(1000, 8, SIGMA, 3 * SIGMA, seed=seed)
        norm_w = float(np.linalg.norm(w))
        shift = (0.08 if seed == 0 else -0.08) * SIGMA * norm_w
        model_q = LinearBinary(w, b + shift)
        cache = build_irs_cache(
            model,
            x,
            labels,
            SIGMA,
            n0=100,
            n=1000,
            alpha=0.001,
            n_p_max=1000,
            seed=seed,
            batch_size=20_000,
            progress=False,
        )
        cert = certify_incremental(
            model_q,
            x,
            labels,
            cache,
            n_p=500,
            alpha_zeta=0.001,
            gamma=0.95,
            batch_size=20_000,
            progress=False,
        )
        xs = x.double().numpy()
        s, s_q = xs @ w + b, xs @ w + b + shift
        cls_q = (s_q > 0).astype(np.int64)
        exact_q = np.abs(s_q) / norm_w
        p_dis = np.abs(norm.cdf(s / (SIGMA * norm_w)) - norm.cdf(s_q / (SIGMA * norm_w)))
        claimed = cert.predict >= 0
        failures += int((claimed & ((cert.predict != cls_q) | (cert.radius > exact_q))).sum())
        branch = cert.meta["branch"]
        zrows = branch == "zeta"
        zeta_used += int(zrows.sum())
        plain_used += int((branch == "plain").sum())
        zeta_misses += int((cert.zeta[zrows] < p_dis[zrows]).sum())
        assert np.isnan(cert.zeta[~zrows]).all()
        assert cert.alpha == pytest.approx(0.002)
        # the incremental certificate is useful, not vacuous
        assert cert.certified_accuracy(0.25) > 0.5 * cache.certificate().certified_accuracy(0.25)
        total += len(labels)
    assert total == 2000
    assert zeta_used > 500 and plain_used > 100
    assert failures <= 0.005 * total
    assert zeta_misses <= 0.005 * zeta_used


def test_incremental_tight_with_large_n():
    """n = 100,000, n_p = 50,000, f' less confident than f by a small bias shift: sound, and
    within 10% of the exact radius for exact radius in [0.25 sigma, 2 sigma]."""
    sigma = 0.25
    model, w, b, x, labels, _exact = linear_trials(200, 8, sigma, 2.2 * sigma, seed=5)
    keep = labels == 1
    x, labels = x[keep], labels[keep]
    norm_w = float(np.linalg.norm(w))
    shift = -0.02 * sigma * norm_w
    cache = build_irs_cache(
        model,
        x,
        labels,
        sigma,
        n0=100,
        n=100_000,
        n_p_max=50_000,
        batch_size=50_000,
        progress=False,
    )
    cert = certify_incremental(
        LinearBinary(w, b + shift), x, labels, cache, n_p=50_000, batch_size=50_000, progress=False
    )
    exact_q = (x.double().numpy() @ w + b + shift) / norm_w
    assert not (cert.radius > np.maximum(exact_q, 0)).any()
    band = (exact_q >= 0.25 * sigma) & (exact_q <= 2 * sigma)
    assert band.sum() > 50 and cert.correct[band].all()
    assert ((exact_q[band] - cert.radius[band]) / exact_q[band]).max() <= 0.10


def test_identical_network_gives_closed_form_zeta(small):
    model, _w, _b, x, labels, cache = small
    cert = certify_incremental(
        model, x, labels, cache, n_p=100, alpha_zeta=0.01, gamma=1.0, progress=False
    )
    z = cert.zeta[cert.meta["branch"] == "zeta"]
    assert len(z) > 0
    np.testing.assert_allclose(z, 1 - 0.01 ** (1 / 100), rtol=1e-9)  # n_delta = 0


def test_branches_and_forward_passes(small):
    model, _w, _b, x, labels, cache = small
    labels = labels.copy()
    labels[0] = 1 - cache.c_a[0]  # force the misclassified shortcut on image 0
    cache = IRSCache(
        **{
            k: getattr(cache, k)
            for k in ("c_a", "pa_lower", "counts_a", "counts", "predictions", "image_keys", "meta")
        },
        labels=labels,
    )
    cert = certify_incremental(model, x, labels, cache, n_p=50, gamma=0.9, progress=False)
    br = cert.meta["branch"]
    assert br[0] == "shortcut" and not cert.correct[0] and cert.radius[0] == 0
    assert set(br) <= {"shortcut", "abstain", "zeta", "plain"}
    ran = np.isin(br, ["zeta", "plain"]).sum()
    assert cert.forward_passes == 50 * ran
    assert (cert.pa_lower[br == "plain"] >= 0).all()
    assert sum(cert.meta["branches"].values()) == len(labels)


def test_cache_round_trip(tmp_path, small):
    _m, _w, _b, _x, _labels, cache = small
    path = cache.save(tmp_path / "c.npz")
    back = IRSCache.load(path)
    for k in ("c_a", "pa_lower", "counts_a", "counts", "predictions", "labels", "image_keys"):
        np.testing.assert_array_equal(getattr(back, k), getattr(cache, k))
    assert back.meta == cache.meta
    assert back.predictions.dtype == np.int16 and back.predictions.shape == (12, 200)
    assert back.meta["format"] == "arq-irs-cache/1"
    cert = back.certificate()
    assert cert.forward_passes == 12 * 450
    np.testing.assert_array_equal(cert.predict >= 0, cache.pa_lower >= 0.5)


def test_load_or_build_rebuilds_on_mismatch_and_refuses_without_rebuild(tmp_path, small):
    model, _w, _b, x, labels, cache = small
    path = tmp_path / "irs.npz"
    calls = []

    def build(**kw):
        def fn():
            calls.append(kw)
            return _cache(model, x, labels, **kw)

        return fn

    expected = {"checkpoint_sha256": "ckpt-a", "sigma": SIGMA, "n": 400, "n_p_max": 100}
    c1 = load_or_build_irs_cache(path, expected, build())
    assert c1.built and len(calls) == 1 and path.is_file()
    c2 = load_or_build_irs_cache(path, expected, build())  # n_p_max 200 >= 100: reused
    assert not c2.built and len(calls) == 1
    # another checkpoint: rebuilt and overwritten
    other = expected | {"checkpoint_sha256": "ckpt-b"}
    c3 = load_or_build_irs_cache(path, other, build(checkpoint_sha256="ckpt-b"))
    assert c3.built and len(calls) == 2
    assert IRSCache.load(path).meta["checkpoint_sha256"] == "ckpt-b"
    # another sigma without rebuild: refused, file untouched
    with pytest.raises(ValueError, match="sigma"):
        load_or_build_irs_cache(path, other | {"sigma": 0.25}, build(), rebuild=False)
    with pytest.raises(ValueError, match="checkpoint_sha256"):
        load_or_build_irs_cache(path, expected, build(), rebuild=False)
    # more cached samples than the file holds: n_p_max counts as a mismatch
    with pytest.raises(ValueError, match="n_p_max"):
        load_or_build_irs_cache(path, other | {"n_p_max": 300}, build(), rebuild=False)
    assert IRSCache.load(path).meta["checkpoint_sha256"] == "ckpt-b" and len(calls) == 2
    # a build function that does not produce what was asked is an error
    with pytest.raises(ValueError, match="built IRS cache"):
        load_or_build_irs_cache(tmp_path / "new.npz", other | {"sigma": 0.25}, build())
    # a corrupt file is rebuilt, or refused
    path.write_bytes(b"not a cache")
    with pytest.raises(ValueError, match="not a readable IRS cache"):
        load_or_build_irs_cache(path, expected, build(), rebuild=False)
    assert load_or_build_irs_cache(path, expected, build()).built
    assert find_irs_cache(expected, [tmp_path]) == path
    assert find_irs_cache(expected | {"seed": 9}, [tmp_path]) is None


def test_incremental_bad_input(small):
    model, _w, _b, x, labels, cache = small
    with pytest.raises(ValueError, match="n_p=201 exceeds the 200"):
        certify_incremental(model, x, labels, cache, n_p=201, progress=False)
    with pytest.raises(ValueError, match="n_p must be"):
        certify_incremental(model, x, labels, cache, n_p=0, progress=False)
    with pytest.raises(ValueError, match="alpha_zeta"):
        certify_incremental(model, x, labels, cache, n_p=10, alpha_zeta=0.5, progress=False)
    with pytest.raises(ValueError, match="images differ"):
        certify_incremental(model, x + 0.01, labels, cache, n_p=10, progress=False)
    with pytest.raises(ValueError, match="labels differ"):
        certify_incremental(model, x, 1 - labels, cache, n_p=10, progress=False)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        certify_incremental(model, bad, labels, cache, n_p=10, progress=False)
    with pytest.raises(ValueError, match="n_p_max"):
        _cache(model, x, labels, n_p_max=401)
    with pytest.raises(ValueError, match="n0"):
        _cache(model, x, labels, n0=500)
    with pytest.raises(ValueError):
        certify_incremental(torch.nn.Linear(4, 3), x, labels, cache, n_p=10, progress=False)
