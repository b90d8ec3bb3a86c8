"""Incremental randomized smoothing (IRS, Ugare et al., ICLR 2024) with a cached certificate.

The original network f is certified once (:func:`build_irs_cache`) and its per-image results
are kept: the candidate class ``c_A`` (chosen on the selection stream), ``pA_lower`` and the
class counts on the ``n`` estimation samples, and f's predicted class on the first
``n_p_max`` estimation samples. A modified network f' (quantized, pruned) is then certified
with :func:`certify_incremental` on ``n_p`` samples per image:

* **misclassified shortcut**: if the cached ``c_A`` is not the true label, f' is not run; the
  image gets radius 0 and ``correct = False``. This is exact for accuracy metrics (certified
  accuracy, ACR, clean accuracy as "correct and certified"), which is what the certificate is
  for; it does not say what class f' would predict there (``predict`` holds f's answer).
* **original abstained** (``pA_lower <= 1/2``): the disparity branch can only abstain since
  ``zeta >= 0``, so f' is not run either; predict -1, radius 0.
* **disparity branch** (``1/2 < pA_lower < gamma``): the estimation samples ``0..n_p-1`` are
  regenerated from the same :class:`~arq_gym.smoothing.noise.NoiseSource` (same seed, image
  key and stream), ``n_delta`` = how often f' disagrees with f's cached prediction,
  ``zeta`` = one-sided Clopper-Pearson upper bound of ``n_delta / n_p`` at ``alpha_zeta``;
  radius ``sigma * Phi^-1(pA_lower - zeta)`` if ``pA_lower - zeta > 1/2``, else abstain. Sound
  with probability >= 1 - (alpha + alpha_zeta) (union bound; reusing the samples is allowed).
* **plain branch** (``pA_lower >= gamma``, where zeta cannot help): CERTIFY of f' with ``n_p``
  fresh samples (stream 2) at confidence ``alpha + alpha_zeta``. The candidate class is the
  cached ``c_A``: it was selected on the selection stream, which is independent of the fresh
  samples, so the Clopper-Pearson bound on f''s probability of ``c_A`` is valid (a selection
  step with f' would cost forward passes without changing the guarantee).

The cache is an ``.npz`` file whose metadata (checkpoint and data sha256, sigma, n0, n, alpha,
seed, n_p_max, noise scheme, format ``arq-irs-cache/1``) makes it valid;
:func:`load_or_build_irs_cache` rebuilds a cache whose metadata does not match and never uses it
silently.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from arq_gym.smoothing.bounds import lower_confidence_bound, upper_confidence_bound
from arq_gym.smoothing.certificate import Certificate
from arq_gym.smoothing.certify import (
    Classifier,
    _certify_run,
    check_images,
    radius_from_bound,
    resolve_device,
    sample_counts,
)
from arq_gym.smoothing.noise import STREAM_ESTIMATION, STREAM_FRESH, NoiseSource

CACHE_FORMAT = "arq-irs-cache/1"
#: metadata keys compared by :func:`load_or_build_irs_cache` when present in ``expected_meta``
VALIDITY_KEYS = (
    "checkpoint_sha256",
    "data_sha256",
    "sigma",
    "n0",
    "n",
    "alpha",
    "seed",
    "n_p_max",
    "noise",
    "images_sha256",
)


def images_sha256(images) -> str:
    """sha256 of the images as contiguous float32 (ties a cache to the exact inputs)."""
    images, _ = check_images(images)
    return hashlib.sha256(images.numpy().tobytes()).hexdigest()


@dataclass
class IRSCache:
    """The cached certification of an original network f (see the module docstring).

    Per image: ``c_a`` (candidate class), ``pa_lower``, ``counts_a`` (estimation count of
    ``c_a`` among ``n``), ``counts`` (estimation counts of every class), ``predictions``
    (``int16 [N, n_p_max]``: f's class on estimation samples ``0..n_p_max-1``), ``labels``,
    ``image_keys`` (noise addresses = indices in the split). ``meta``: checkpoint_sha256,
    data_sha256, images_sha256, sigma, n0, n, alpha, seed, n_p_max, noise (scheme of the
    noise source), noise_device, noise_chunk, num_classes, forward_passes, seconds, format.
    """

    c_a: np.ndarray
    pa_lower: np.ndarray
    counts_a: np.ndarray
    counts: np.ndarray
    predictions: np.ndarray
    labels: np.ndarray
    image_keys: np.ndarray
    meta: dict
    built: bool = field(default=False, compare=False)  # True when built in this process

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def n_p_max(self) -> int:
        return int(self.meta["n_p_max"])

    @property
    def sigma(self) -> float:
        return float(self.meta["sigma"])

    @property
    def alpha(self) -> float:
        return float(self.meta["alpha"])

    def noise_source(self) -> NoiseSource:
        """The noise source the cache was built with."""
        noise = NoiseSource(
            self.sigma,
            int(self.meta["seed"]),
            chunk_size=int(self.meta["noise_chunk"]),
            device=self.meta["noise_device"],
        )
        if noise.scheme != self.meta["noise"]:
            raise ValueError(f"cache noise scheme {self.meta['noise']!r} is not reproducible here")
        return noise

    def certificate(self) -> Certificate:
        """The certificate of the original network f that the cache holds (Cohen's CERTIFY)."""
        predict = np.where(self.pa_lower >= 0.5, self.c_a, -1)
        return Certificate(
            idx=self.image_keys,
            label=self.labels,
            predict=predict,
            radius=radius_from_bound(self.pa_lower, self.sigma),
            correct=predict == self.labels,
            pa_lower=self.pa_lower,
            zeta=np.full(len(self), np.nan),
            sigma=self.sigma,
            alpha=self.alpha,
            forward_passes=int(self.meta.get("forward_passes", 0)),
            seconds=float(self.meta.get("seconds", 0.0)),
            meta={
                "method": "certify",
                "n0": self.meta["n0"],
                "n": self.meta["n"],
                "seed": self.meta["seed"],
                "noise": self.meta["noise"],
            },
        )

    def mismatches(self, expected_meta: dict) -> list[str]:
        """Keys of ``expected_meta`` this cache does not satisfy (``n_p_max``: the cache may
        hold more samples than asked); also ``format`` when it is not this version's."""
        bad = [] if self.meta.get("format") == CACHE_FORMAT else ["format"]
        for key, want in expected_meta.items():
            have = self.meta.get(key)
            if key == "n_p_max":
                ok = have is not None and int(have) >= int(want)
            elif isinstance(want, float) or isinstance(have, float):
                try:
                    ok = math.isclose(float(have), float(want), rel_tol=1e-12, abs_tol=0.0)
                except (TypeError, ValueError):
                    ok = False
            else:
                ok = have == want
            if not ok:
                bad.append(key)
        return bad

    def save(self, path: str | os.PathLike) -> Path:
        """Write the cache as a compressed ``.npz`` atomically (temporary file + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as fh:
                np.savez_compressed(
                    fh,
                    c_a=self.c_a.astype(np.int64),
                    pa_lower=self.pa_lower.astype(np.float64),
                    counts_a=self.counts_a.astype(np.int64),
                    counts=self.counts.astype(np.int64),
                    predictions=self.predictions.astype(np.int16),
                    labels=self.labels.astype(np.int64),
                    image_keys=self.image_keys.astype(np.int64),
                    meta=np.array(json.dumps(self.meta, sort_keys=True)),
                )
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> IRSCache:
        """Read a cache written by :meth:`save`; ValueError if the file is not one."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"IRS cache {str(path)!r} does not exist")
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                arrays = {
                    k: z[k]
                    for k in (
                        "c_a",
                        "pa_lower",
                        "counts_a",
                        "counts",
                        "predictions",
                        "labels",
                        "image_keys",
                    )
                }
        except Exception as exc:
            raise ValueError(
                f"{path.name} is not a readable IRS cache ({type(exc).__name__}: {exc})"
            ) from exc
        if meta.get("format") != CACHE_FORMAT:
            raise ValueError(
                f"{path.name} has format {meta.get('format')!r}, expected {CACHE_FORMAT!r}"
            )
        return cls(meta=meta, **arrays)


def build_irs_cache(
    model: Classifier,
    images,
    labels,
    sigma: float,
    n0: int = 100,
    n: int = 10_000,
    alpha: float = 0.001,
    n_p_max: int | None = None,
    seed: int = 0,
    image_keys=None,
    batch_size: int = 400,
    device: str | torch.device = "cpu",
    progress: bool = True,
    checkpoint_sha256: str = "",
    data_sha256: str = "",
    num_classes: int | None = None,
    noise_device: str | None = None,
) -> IRSCache:
    """Certify the original network (CERTIFY, same arguments as
    :func:`~arq_gym.smoothing.certify`) and keep what IRS needs: ``n_p_max`` (default ``n``,
    at most ``n``) leading estimation predictions per image. ``checkpoint_sha256`` and
    ``data_sha256`` identify the network and the image subset in the metadata."""
    n_p_max = int(n) if n_p_max is None else int(n_p_max)
    if not 1 <= n_p_max <= int(n):
        raise ValueError(f"n_p_max must be in [1, n={n}], got {n_p_max}")
    run = _certify_run(model, images, labels, sigma, n0=n0, n=n, alpha=alpha,
                       batch_size=batch_size, seed=seed, image_keys=image_keys, device=device,
                       progress=progress, num_classes=num_classes, keep=n_p_max,
                       noise_device=noise_device)  # fmt: skip
    cert = run.cert
    noise = NoiseSource(sigma, seed, device=noise_device or "cpu")
    meta = {
        "format": CACHE_FORMAT,
        "checkpoint_sha256": str(checkpoint_sha256),
        "data_sha256": str(data_sha256),
        "images_sha256": images_sha256(images),
        "sigma": float(sigma),
        "n0": int(n0),
        "n": int(n),
        "alpha": float(alpha),
        "seed": int(seed),
        "n_p_max": n_p_max,
        "noise": noise.scheme,
        "noise_device": noise.device.type,
        "noise_chunk": noise.chunk_size,
        "num_classes": int(run.counts.shape[1]),
        "forward_passes": cert.forward_passes,
        "seconds": cert.seconds,
    }
    preds = np.stack(run.kept) if len(run.kept) else np.zeros((0, n_p_max), dtype=np.int16)
    return IRSCache(
        c_a=run.c_a.astype(np.int64),
        pa_lower=cert.pa_lower,
        counts_a=run.n_a,
        counts=run.counts,
        predictions=preds.astype(np.int16),
        labels=cert.label,
        image_keys=cert.idx,
        meta=meta,
        built=True,
    )


def read_cache_meta(path: str | os.PathLike) -> dict | None:
    """The metadata of the cache at ``path`` (reads only that entry), or None if unreadable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return json.loads(str(z["meta"]))
    except Exception:
        return None


def find_irs_cache(expected_meta: dict, dirs) -> Path | None:
    """The first ``*.npz`` cache in ``dirs`` (folders, in order; missing ones skipped) whose
    metadata satisfies ``expected_meta`` (same rules as :func:`load_or_build_irs_cache`)."""
    probe = IRSCache(*(np.zeros(0),) * 7, meta={})
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            continue
        for path in sorted(d.glob("*.npz")):
            meta = read_cache_meta(path)
            if meta is None:
                continue
            probe.meta = meta
            if not probe.mismatches(expected_meta):
                return path
    return None


def load_or_build_irs_cache(
    path: str | os.PathLike,
    expected_meta: dict,
    build_fn: Callable[[], IRSCache],
    rebuild: bool = True,
) -> IRSCache:
    """The cache at ``path`` if its metadata matches ``expected_meta``; otherwise build it.

    A missing file is built with ``build_fn()`` and saved. An existing file whose metadata does
    not match (or that cannot be read) is rebuilt and overwritten atomically, or, with
    ``rebuild=False``, refused with a ValueError naming the mismatching keys. The built cache
    must itself match ``expected_meta``.
    """
    path = Path(path)
    problem = None
    if path.is_file():
        try:
            cache = IRSCache.load(path)
        except ValueError as exc:
            problem = str(exc)
        else:
            bad = cache.mismatches(expected_meta)
            if not bad:
                return cache
            problem = "metadata differs in " + ", ".join(
                f"{k} (cache {cache.meta.get(k)!r}, expected {expected_meta.get(k, CACHE_FORMAT)!r})"
                for k in bad
            )
        if not rebuild:
            raise ValueError(
                f"IRS cache {path.name} does not fit: {problem}; "
                "rebuild it (rebuild=True) or point to another cache"
            )
    cache = build_fn()
    bad = cache.mismatches(expected_meta)
    if bad:
        raise ValueError(
            f"the built IRS cache does not match the expected metadata in {', '.join(bad)}"
        )
    cache.save(path)
    cache.built = True
    return cache


def certify_incremental(
    model_q: Classifier,
    images,
    labels,
    cache: IRSCache,
    n_p: int = 500,
    alpha_zeta: float = 0.001,
    gamma: float = 0.99,
    batch_size: int = 400,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Certificate:
    """Certify the modified network ``model_q`` with IRS on the images of ``cache``.

    ``images``/``labels`` must be the ones the cache was built on (checked by hash). ``n_p``
    samples per image (1 <= n_p <= ``cache.n_p_max``), disparity bound at ``alpha_zeta``,
    plain-certification threshold ``gamma``; branches as in the module docstring. The overall
    failure probability per image is ``alpha + alpha_zeta`` (``Certificate.alpha``);
    ``Certificate.zeta`` is set on disparity-branch images, NaN elsewhere;
    ``Certificate.pa_lower`` is the cached bound (disparity branch, radius from
    ``pa_lower - zeta``) or f''s own bound (plain branch); ``meta["branch"]`` names the branch
    per image.
    """
    t0 = time.perf_counter()
    if not isinstance(cache, IRSCache):
        raise ValueError(f"cache must be an IRSCache, got {type(cache).__name__}")
    n_p = int(n_p)
    if n_p < 1:
        raise ValueError(f"n_p must be >= 1, got {n_p}")
    if n_p > cache.n_p_max:
        raise ValueError(
            f"n_p={n_p} exceeds the {cache.n_p_max} samples per image held in the "
            "cache; rebuild the cache with a larger n_p_max"
        )
    if not 0.0 < float(alpha_zeta) < 0.5:
        raise ValueError(f"alpha_zeta must be in (0, 0.5), got {alpha_zeta}")
    if not 0.0 <= float(gamma) <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    images, labels = check_images(images, labels)
    if labels is None or not np.array_equal(labels, cache.labels):
        raise ValueError("labels differ from the ones the IRS cache was built with")
    if images_sha256(images) != cache.meta["images_sha256"]:
        raise ValueError("images differ from the ones the IRS cache was built with")
    sigma, alpha, alpha_zeta, gamma = cache.sigma, cache.alpha, float(alpha_zeta), float(gamma)
    num = len(cache)
    noise = cache.noise_source()
    orig_predict = np.where(cache.pa_lower >= 0.5, cache.c_a, -1)

    branch = np.full(num, "zeta", dtype=object)
    branch[cache.pa_lower >= gamma] = "plain"
    branch[cache.pa_lower <= 0.5] = "abstain"
    branch[cache.c_a != labels] = "shortcut"
    zeta_rows = np.flatnonzero(branch == "zeta")
    plain_rows = np.flatnonzero(branch == "plain")
    jobs = [(int(i), STREAM_ESTIMATION, n_p, n_p) for i in zeta_rows]
    jobs += [(int(i), STREAM_FRESH, n_p, 0) for i in plain_rows]
    res = sample_counts(
        model_q,
        images,
        cache.image_keys,
        jobs,
        noise,
        batch_size=int(batch_size),
        device=resolve_device(device),
        num_classes=int(cache.meta["num_classes"]),
        progress=progress,
        desc="certify-irs",
    )

    predict = orig_predict.copy()
    radius = np.zeros(num)
    pa_lower = cache.pa_lower.astype(np.float64).copy()
    zeta = np.full(num, np.nan)
    per_image_time = np.zeros(num)
    predict[branch == "abstain"] = -1

    if len(zeta_rows):
        kept = np.stack(res.kept[: len(zeta_rows)])
        n_delta = (kept != cache.predictions[zeta_rows, :n_p]).sum(axis=1)
        z = np.atleast_1d(upper_confidence_bound(n_delta, n_p, alpha_zeta))
        p = pa_lower[zeta_rows] - z
        ok = p > 0.5
        zeta[zeta_rows] = z
        predict[zeta_rows] = np.where(ok, cache.c_a[zeta_rows], -1)
        radius[zeta_rows] = np.where(ok, radius_from_bound(np.where(ok, p, 0.5), sigma), 0.0)
        per_image_time[zeta_rows] = res.job_seconds[: len(zeta_rows)]
    if len(plain_rows):
        counts = res.counts[len(zeta_rows) :]
        n_a = counts[np.arange(len(plain_rows)), cache.c_a[plain_rows]]
        pa = np.atleast_1d(lower_confidence_bound(n_a, n_p, alpha + alpha_zeta))
        pa_lower[plain_rows] = pa
        predict[plain_rows] = np.where(pa >= 0.5, cache.c_a[plain_rows], -1)
        radius[plain_rows] = radius_from_bound(pa, sigma)
        per_image_time[plain_rows] = res.job_seconds[len(zeta_rows) :]

    correct = (predict == labels) & (branch != "shortcut")
    radius = np.where(branch == "shortcut", 0.0, radius)
    names, counts_b = np.unique(branch.astype(str), return_counts=True)
    return Certificate(
        idx=cache.image_keys,
        label=labels,
        predict=predict,
        radius=radius,
        correct=correct,
        pa_lower=pa_lower,
        zeta=zeta,
        sigma=sigma,
        alpha=alpha + alpha_zeta,
        forward_passes=res.forward_passes,
        seconds=time.perf_counter() - t0,
        time=per_image_time,
        meta={
            "method": "irs",
            "n_p": n_p,
            "alpha_zeta": alpha_zeta,
            "gamma": gamma,
            "branch": branch.astype(str),
            "branches": {str(k): int(v) for k, v in zip(names, counts_b)},
        },
    )
