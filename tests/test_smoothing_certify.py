"""CERTIFY / PREDICT: seeded noise, batch-size independence, soundness on a linear classifier
whose smoothed version and robust radius are known in closed form, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch import nn

from arq_gym.smoothing import NoiseSource, build_irs_cache, certify, predict


class LinearBinary(nn.Module):
    """f(x) = [w.x + b > 0] as two logits (-s, s). Its smoothed classifier equals f and the
    exact l2 robust radius of the smoothed classifier at x is |w.x + b| / ||w||."""

    def __init__(self, w: np.ndarray, b: float):
        super().__init__()
        self.register_buffer("w", torch.as_tensor(w, dtype=torch.float32))
        self.b = float(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.flatten(1) @ self.w + self.b
        return torch.stack([-s, s], dim=1)


def linear_trials(num: int, d: int, sigma: float, max_radius: float, seed: int):
    """Points at signed distance uniform in [-max_radius, max_radius] from the hyperplane."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=d)
    b = float(rng.normal())
    unit = w / np.linalg.norm(w)
    base = rng.normal(size=(num, d))
    base -= np.outer(base @ w + b, w) / (w @ w)  # project onto the hyperplane
    dist = rng.uniform(-max_radius, max_radius, size=num)
    x = base + dist[:, None] * unit
    labels = (x @ w + b > 0).astype(np.int64)
    exact = np.abs(x @ w + b) / np.linalg.norm(w)
    return LinearBinary(w, b), w, b, torch.tensor(x, dtype=torch.float32), labels, exact


# --------------------------------------------------------------------------- noise


def test_noise_is_independent_of_the_split():
    src = NoiseSource(0.5, seed=3, chunk_size=16)
    whole = src.sample(7, 1, 0, 100, (2, 3))
    assert whole.shape == (100, 2, 3)
    for bs in (1, 7, 16, 33, 100):
        parts = torch.cat(
            [src.sample(7, 1, s, min(bs, 100 - s), (2, 3)) for s in range(0, 100, bs)]
        )
        assert torch.equal(parts, whole)
    # a fresh source (empty chunk cache) and out-of-order access give the same values
    fresh = NoiseSource(0.5, seed=3, chunk_size=16)
    assert torch.equal(fresh.sample(7, 1, 50, 50, (2, 3)), whole[50:])
    assert torch.equal(fresh.sample(7, 1, 3, 20, (2, 3)), whole[3:23])


def test_noise_streams_keys_and_seeds_differ_and_scale():
    src = NoiseSource(0.25, seed=0)
    a = src.sample(0, 0, 0, 64, (8,))
    assert not torch.equal(a, src.sample(0, 1, 0, 64, (8,)))
    assert not torch.equal(a, src.sample(1, 0, 0, 64, (8,)))
    assert not torch.equal(a, NoiseSource(0.25, seed=1).sample(0, 0, 0, 64, (8,)))
    assert torch.allclose(NoiseSource(0.5, seed=0).sample(0, 0, 0, 64, (8,)), 2 * a)
    big = src.sample(5, 1, 0, 4000, (50,))
    assert abs(big.std().item() - 0.25) < 0.005 and abs(big.mean().item()) < 0.005


@pytest.mark.parametrize("sigma,seed", [(0.0, 0), (-1.0, 0), (float("nan"), 0), (0.5, -1)])
def test_noise_rejects_bad_parameters(sigma, seed):
    with pytest.raises(ValueError):
        NoiseSource(sigma, seed)


# --------------------------------------------------------------------------- batch independence


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny networks run fastest on one thread (and do not fight a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_same_counts_at_any_batch_size():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    images = torch.rand(2, 1, 8, 8)
    labels = np.array([0, 1])
    ref = None
    for bs in (1, 7, 100, 400):
        cache = build_irs_cache(
            model, images, labels, 0.5, n0=20, n=300, n_p_max=300, batch_size=bs, progress=False
        )
        got = (cache.counts, cache.predictions, cache.c_a, cache.pa_lower)
        if ref is None:
            ref = got
            assert cache.counts.sum() == 600 and len(np.unique(cache.predictions)) > 1
        else:
            for a, b in zip(ref, got):
                np.testing.assert_array_equal(a, b)


def test_certify_is_deterministic_and_seed_dependent():
    model, _w, _b, x, labels, _ex = linear_trials(6, 4, 0.5, 0.3, seed=1)
    c1 = certify(model, x, labels, 0.5, n0=10, n=200, seed=5, progress=False)
    c2 = certify(model, x, labels, 0.5, n0=10, n=200, seed=5, batch_size=33, progress=False)
    c3 = certify(model, x, labels, 0.5, n0=10, n=200, seed=6, progress=False)
    np.testing.assert_array_equal(c1.pa_lower, c2.pa_lower)
    assert not np.array_equal(c1.pa_lower, c3.pa_lower)
    assert c1.forward_passes == 6 * 210
    np.testing.assert_array_equal(c1.idx, np.arange(6))


# --------------------------------------------------------------------------- soundness


def test_certify_sound_on_linear_classifier():
    """2,000 (point, seed) trials, alpha = 0.001: the certified radius may exceed the exact
    one (or certify a wrong class) in at most 0.5% of trials (expected <= 0.1%)."""
    sigma, alpha = 0.5, 0.001
    failures, total = 0, 0
    for seed in (0, 1):
        model, _w, _b, x, labels, exact = linear_trials(1000, 8, sigma, 2.5 * sigma, seed=seed)
        cert = certify(
            model,
            x,
            labels,
            sigma,
            n0=100,
            n=1000,
            alpha=alpha,
            batch_size=20_000,
            seed=seed,
            progress=False,
        )
        certified = cert.predict >= 0
        wrong = certified & ((cert.predict != labels) | (cert.radius > exact))
        failures += int(wrong.sum())
        total += len(labels)
        # the bound is not vacuous: most points far from the boundary are certified
        far = exact > 0.5 * sigma
        assert (cert.correct[far] & (cert.radius[far] > 0)).mean() > 0.9
        assert cert.forward_passes == 1000 * 1100
    assert total == 2000
    assert failures <= 0.005 * total


def test_certify_tight_on_linear_classifier_with_large_n():
    """n = 100,000: sound, and within 10% of the exact radius for exact radius in
    [0.25 sigma, 2 sigma] (below 0.25 sigma the sampling error of pA alone exceeds 10%)."""
    sigma = 0.25
    model, _w, _b, x, labels, exact = linear_trials(200, 8, sigma, 2 * sigma, seed=7)
    cert = certify(
        model,
        x,
        labels,
        sigma,
        n0=100,
        n=100_000,
        alpha=0.001,
        batch_size=50_000,
        seed=0,
        progress=False,
    )
    assert not (cert.radius > exact).any()
    band = exact >= 0.25 * sigma
    assert band.sum() > 100
    assert cert.correct[band].all()
    rel = (exact[band] - cert.radius[band]) / exact[band]
    assert rel.max() <= 0.10


def test_predict_on_linear_classifier():
    sigma = 0.5
    model, w, b, x, labels, exact = linear_trials(40, 4, sigma, 3 * sigma, seed=3)
    out = predict(model, x, sigma, n=1000, alpha=0.001, batch_size=5000, progress=False)
    far = exact > sigma
    assert (out[far] == labels[far]).all()
    assert ((out == labels) | (out == -1)).mean() >= 0.95
    # on the decision boundary the smoothed classifier is a coin flip: PREDICT abstains
    on = torch.tensor(x.numpy() - np.outer(x.numpy() @ w + b, w) / (w @ w), dtype=torch.float32)
    assert (predict(model, on, sigma, n=1000, alpha=0.001, progress=False) == -1).mean() >= 0.9


def test_certify_radius_matches_closed_form_pa():
    """With n large the bound approaches Phi(s / (sigma ||w||)) from below."""
    sigma = 1.0
    model, w, b, x, labels, exact = linear_trials(20, 4, sigma, 1.5 * sigma, seed=4)
    cert = certify(
        model, x, labels, sigma, n0=50, n=20_000, alpha=0.001, batch_size=50_000, progress=False
    )
    p_true = norm.cdf(exact / sigma)
    ok = cert.predict >= 0
    assert (cert.pa_lower[ok] <= p_true[ok] + 1e-12).all()
    assert (p_true[ok] - cert.pa_lower[ok]).max() < 0.02


# --------------------------------------------------------------------------- bad input


@pytest.fixture()
def lin():
    model, *_rest, x, labels, _exact = linear_trials(3, 4, 0.5, 1.0, seed=0)
    return model, x, labels


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_rejects_non_finite_images(lin, bad):
    model, x, labels = lin
    x = x.clone()
    x[1, 2] = bad
    with pytest.raises(ValueError, match="NaN or inf.*image 1"):
        certify(model, x, labels, 0.5, n0=10, n=20, progress=False)
    with pytest.raises(ValueError, match="NaN or inf"):
        predict(model, x, 0.5, n=20, progress=False)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"n0": 30, "n": 20}, "n0"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 0.5}, "alpha"),
        ({"alpha": -0.1}, "alpha"),
        ({"sigma": 0.0}, "sigma"),
        ({"sigma": -0.25}, "sigma"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_rejects_bad_parameters(lin, kw, match):
    model, x, labels = lin
    args = {"sigma": 0.5, "n0": 10, "n": 20} | kw
    with pytest.raises(ValueError, match=match):
        certify(model, x, labels, progress=False, **args)


def test_rejects_uint8_and_mismatched_labels(lin):
    model, x, labels = lin
    with pytest.raises(ValueError, match="floating point"):
        certify(model, (x * 0).to(torch.uint8), labels, 0.5, n0=10, n=20, progress=False)
    with pytest.raises(ValueError, match="labels"):
        certify(model, x, labels[:2], 0.5, n0=10, n=20, progress=False)
    with pytest.raises(ValueError, match="classes"):
        certify(model, x, labels, 0.5, n0=10, n=20, num_classes=10, progress=False)


def test_rejects_model_on_another_device(lin):
    model, x, labels = lin
    with pytest.raises(ValueError, match="model is on cpu"):
        certify(torch.nn.Linear(4, 2), x, labels, 0.5, n0=10, n=20, device="meta", progress=False)
