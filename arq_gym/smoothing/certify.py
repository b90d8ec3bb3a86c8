"""CERTIFY and PREDICT of Cohen, Rosenfeld and Kolter (ICML 2019) for any torch classifier.

The classifier is any callable mapping a float batch ``[B, C, H, W]`` of images in [0, 1] to
logits ``[B, num_classes]`` (normalisation inside the model, noise added in pixel space). The
base classifier's class is ``argmax`` of the logits.

Noisy samples of several images are packed into the same batch (``batch_size`` samples per
forward pass, whatever the number of samples per image), so small sample counts do not waste
forward passes; class counts are accumulated with ``torch.bincount`` on the compute device.
The noise comes from :class:`~arq_gym.smoothing.noise.NoiseSource`, so the counts do not depend
on ``batch_size`` (up to the network's own floating-point batch effects).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import binomtest, norm

from arq_gym.allocator import keep_activation_memory
from arq_gym.smoothing.bounds import lower_confidence_bound
from arq_gym.smoothing.certificate import Certificate
from arq_gym.smoothing.noise import (
    STREAM_ESTIMATION,
    STREAM_PREDICT,
    STREAM_SELECTION,
    NoiseSource,
)

Classifier = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- input checks


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None -> CUDA when available, else CPU; anything else as given."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_images(images, labels=None) -> tuple[torch.Tensor, np.ndarray | None]:
    """Images as a float32 CPU tensor ``[N, ...]`` (finite), labels as int64 numpy."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise ValueError(
            f"images must be a torch tensor or numpy array, got {type(images).__name__}"
        )
    if not images.is_floating_point():
        raise ValueError(
            f"images must be floating point in [0, 1], got dtype {images.dtype} "
            "(convert uint8 images with x.float() / 255)"
        )
    if images.dim() < 2:
        raise ValueError(
            f"images must have shape [N, C, H, W] (or [N, D]), got {tuple(images.shape)}"
        )
    images = images.detach().to("cpu", torch.float32).contiguous()
    if not torch.isfinite(images).all():
        bad = int((~torch.isfinite(images)).flatten(1).any(1).nonzero()[0, 0])
        raise ValueError(f"images contain NaN or inf (first at image {bad})")
    if labels is not None:
        labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
        labels = labels.astype(np.int64).reshape(-1)
        if len(labels) != len(images):
            raise ValueError(f"got {len(images)} images but {len(labels)} labels")
    return images, labels


def check_params(sigma: float, alpha: float, n0: int | None, n: int, batch_size: int) -> None:
    """Raise ValueError with one clear line for out-of-range certification parameters."""
    try:
        sigma_f, alpha_f = float(sigma), float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"sigma and alpha must be numbers, got {sigma!r} and {alpha!r}") from None
    if not (math.isfinite(sigma_f) and sigma_f > 0):
        raise ValueError(f"sigma must be a positive number, got {sigma}")
    if not 0.0 < alpha_f < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5), got {alpha}")
    if int(n) < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n0 is not None:
        if int(n0) < 1:
            raise ValueError(f"n0 must be >= 1, got {n0}")
        if int(n0) > int(n):
            raise ValueError(f"n0 ({n0}) must not exceed n ({n})")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _keys(image_keys, num: int) -> np.ndarray:
    if image_keys is None:
        return np.arange(num, dtype=np.int64)
    keys = np.asarray(image_keys, dtype=np.int64).reshape(-1)
    if len(keys) != num:
        raise ValueError(f"got {num} images but {len(keys)} image_keys")
    if (keys < 0).any():
        raise ValueError("image_keys must be non-negative")
    return keys


# --------------------------------------------------------------------------- the sampler


@dataclass
class SampleResult:
    """Output of :func:`sample_counts`."""

    counts: np.ndarray  # [jobs, num_classes] int64
    kept: list[np.ndarray | None]  # per job: predictions of its first `keep` samples (int16)
    forward_passes: int
    seconds: float
    job_seconds: np.ndarray  # seconds attributed to each job


def sample_counts(
    model: Classifier,
    images: torch.Tensor,
    image_keys: np.ndarray,
    jobs: Sequence[tuple[int, int, int, int]],
    noise: NoiseSource,
    *,
    batch_size: int = 400,
    device: str | torch.device = "cpu",
    num_classes: int | None = None,
    progress: bool = False,
    desc: str = "certify",
) -> SampleResult:
    """Run the base classifier on noisy samples and count its classes.

    ``jobs`` are ``(row, stream, count, keep)``: samples ``0..count-1`` of stream ``stream`` of
    image ``images[row]`` (noise addressed by ``image_keys[row]``); the predicted classes of the
    first ``keep`` samples are returned too. Samples of consecutive jobs share batches of
    ``batch_size``. ``images`` must already be checked (float32, finite).
    """
    from tqdm.auto import tqdm

    dev = resolve_device(device)
    if dev.type == "cpu":
        keep_activation_memory()
    params = getattr(model, "parameters", None)
    first = next(iter(params()), None) if callable(params) else None
    if first is not None and first.device.type != dev.type:
        raise ValueError(
            f"the model is on {first.device.type} but device={str(device)!r}; "
            "move it there first (model.to(device))"
        )
    shape = tuple(images.shape[1:])
    images_dev = images.to(dev)
    jobs = [(int(r), int(s), int(c), int(k)) for r, s, c, k in jobs]
    counts_dev: torch.Tensor | None = None
    kept: list[np.ndarray | None] = [
        np.full(min(k, c), -1, dtype=np.int16) if k > 0 else None for _r, _s, c, k in jobs
    ]
    job_seconds = np.zeros(len(jobs))
    total = sum(c for _r, _s, c, _k in jobs)
    n_cls = num_classes
    t_start = time.perf_counter()
    was_training = getattr(model, "training", None)
    if hasattr(model, "eval"):
        model.eval()

    def flush(pieces: list[tuple[int, int, int]]) -> None:
        nonlocal counts_dev, n_cls
        t0 = time.perf_counter()
        noise_parts, rows, job_ids, takes = [], [], [], []
        for j, start, take in pieces:
            row, stream, _c, _k = jobs[j]
            noise_parts.append(noise.standard(int(image_keys[row]), stream, start, take, shape))
            rows.append(row)
            job_ids.append(j)
            takes.append(take)
        eps = noise_parts[0] if len(noise_parts) == 1 else torch.cat(noise_parts)
        if len(rows) == 1:
            batch = eps.to(dev) * noise.sigma + images_dev[rows[0]]
        else:
            rows_t = torch.from_numpy(np.repeat(np.asarray(rows), takes)).to(dev)
            batch = images_dev[rows_t] + eps.to(dev) * noise.sigma
        logits = model(batch)
        if logits.dim() != 2 or logits.shape[0] != batch.shape[0]:
            raise ValueError(
                f"the classifier must return logits [batch, classes], got {tuple(logits.shape)}"
            )
        if n_cls is None:
            n_cls = int(logits.shape[1])
        elif logits.shape[1] != n_cls:
            raise ValueError(f"the classifier returned {logits.shape[1]} classes, expected {n_cls}")
        pred = logits.argmax(dim=1)
        j0 = job_ids[0]
        span = job_ids[-1] - j0 + 1
        if span == 1:
            binc = torch.bincount(pred, minlength=n_cls).view(1, n_cls)
        else:
            local = np.repeat(np.asarray(job_ids) - j0, takes) * n_cls
            binc = torch.bincount(
                torch.from_numpy(local).to(dev) + pred, minlength=span * n_cls
            ).view(span, n_cls)
        if counts_dev is None:
            counts_dev = torch.zeros((len(jobs), n_cls), dtype=torch.int64, device=dev)
        counts_dev[j0 : j0 + span] += binc
        if any(jobs[j][3] > start for j, start, _t in pieces):
            pred_cpu = pred.to("cpu", torch.int16).numpy()
            off = 0
            for j, start, take in pieces:
                keep = jobs[j][3]
                if keep > start:
                    m = min(take, keep - start)
                    kept[j][start : start + m] = pred_cpu[off : off + m]
                off += take
        dt = time.perf_counter() - t0
        b = float(sum(takes))
        for j, take in zip(job_ids, takes):
            job_seconds[j] += dt * take / b
        bar.update(int(b))

    try:
        with (
            torch.inference_mode(),
            tqdm(
                total=total,
                disable=not progress,
                desc=desc,
                unit="sample",
                unit_scale=True,
                leave=False,
            ) as bar,
        ):
            pieces: list[tuple[int, int, int]] = []
            filled = 0
            for j, (_row, _stream, count, _keep) in enumerate(jobs):
                pos = 0
                while pos < count:
                    take = min(batch_size - filled, count - pos)
                    pieces.append((j, pos, take))
                    filled += take
                    pos += take
                    if filled == batch_size:
                        flush(pieces)
                        pieces, filled = [], 0
            if pieces:
                flush(pieces)
    finally:
        if was_training and hasattr(model, "train"):
            model.train(True)
    if counts_dev is None:  # no samples at all
        counts = np.zeros((len(jobs), n_cls or 0), dtype=np.int64)
    else:
        counts = counts_dev.cpu().numpy()
    return SampleResult(counts, kept, total, time.perf_counter() - t_start, job_seconds)


# --------------------------------------------------------------------------- CERTIFY / PREDICT


def radius_from_bound(pa_lower, sigma: float) -> np.ndarray:
    """``sigma * Phi^-1(pa_lower)`` where ``pa_lower >= 1/2``, else 0 (abstain)."""
    pa = np.asarray(pa_lower, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = sigma * norm.ppf(pa)
    return np.where(pa >= 0.5, r, 0.0)


@dataclass
class _CertifyRun:
    cert: Certificate
    counts: np.ndarray  # estimation counts [N, C]
    c_a: np.ndarray
    n_a: np.ndarray
    kept: list[np.ndarray | None]


def _certify_run(model, images, labels, sigma, *, n0, n, alpha, batch_size, seed, image_keys,
                 device, progress, num_classes, keep, noise_device) -> _CertifyRun:  # fmt: skip
    check_params(sigma, alpha, n0, n, batch_size)
    sigma, alpha, n0, n = float(sigma), float(alpha), int(n0), int(n)
    images, labels = check_images(images, labels)
    if labels is None:
        raise ValueError("labels are required")
    keys = _keys(image_keys, len(images))
    dev = resolve_device(device)
    noise = NoiseSource(sigma, seed, device=noise_device or "cpu")
    num = len(images)
    jobs = [(i, STREAM_SELECTION, int(n0), 0) for i in range(num)]
    jobs += [(i, STREAM_ESTIMATION, int(n), int(keep)) for i in range(num)]
    res = sample_counts(
        model,
        images,
        keys,
        jobs,
        noise,
        batch_size=int(batch_size),
        device=dev,
        num_classes=num_classes,
        progress=progress,
        desc="certify",
    )
    sel, est = res.counts[:num], res.counts[num:]
    c_a = sel.argmax(axis=1) if num else np.zeros(0, dtype=np.int64)
    n_a = est[np.arange(num), c_a] if num else np.zeros(0, dtype=np.int64)
    pa_lower = lower_confidence_bound(n_a, n, alpha) if num else np.zeros(0)
    pa_lower = np.atleast_1d(np.asarray(pa_lower, dtype=np.float64))
    predict = np.where(pa_lower >= 0.5, c_a, -1)
    radius = radius_from_bound(pa_lower, sigma)
    cert = Certificate(
        idx=keys,
        label=labels,
        predict=predict,
        radius=radius,
        correct=predict == labels,
        pa_lower=pa_lower,
        zeta=np.full(num, np.nan),
        sigma=sigma,
        alpha=alpha,
        forward_passes=res.forward_passes,
        seconds=res.seconds,
        time=res.job_seconds[:num] + res.job_seconds[num:],
        meta={
            "method": "certify",
            "n0": int(n0),
            "n": int(n),
            "seed": int(seed),
            "noise": noise.scheme,
        },
    )
    return _CertifyRun(cert, est, c_a, n_a, res.kept[num:])


def certify(
    model: Classifier,
    images,
    labels,
    sigma: float,
    n0: int = 100,
    n: int = 10_000,
    alpha: float = 0.001,
    batch_size: int = 400,
    seed: int = 0,
    image_keys=None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    num_classes: int | None = None,
    noise_device: str | None = None,
) -> Certificate:
    """CERTIFY of Cohen et al. for every image; returns a :class:`Certificate`.

    For image x: the most frequent class ``c_A`` of the base classifier on ``n0`` noisy copies
    (selection stream); ``n_A`` = how often it says ``c_A`` on ``n`` further copies (estimation
    stream); ``pA_lower`` = one-sided ``(1 - alpha)`` Clopper-Pearson lower bound of
    ``n_A / n``; abstain (predict -1, radius 0) if ``pA_lower < 1/2``, else radius
    ``sigma * Phi^-1(pA_lower)``. With probability >= 1 - alpha per image the smoothed
    classifier is constant (= ``c_A``) on the l2 ball of that radius.

    Args:
        model: callable images -> logits (an ``nn.Module`` is put in eval mode meanwhile).
        images: float ``[N, C, H, W]`` in [0, 1] (tensor or array); NaN/inf is an error.
        labels: ``[N]`` true classes (``correct = predict == label``).
        sigma: noise level (> 0); n0, n: selection and estimation samples (1 <= n0 <= n);
        alpha: failure probability in (0, 0.5).
        batch_size: noisy samples per forward pass (samples of several images are packed).
        seed: noise seed; image_keys: per-image noise address and ``Certificate.idx``
            (default ``0..N-1``; pass the index in the split so a subset reuses the same noise).
        device: "cpu", "cuda" or "auto"; noise_device: where the noise is generated (default
            CPU, identical values on every machine).
        progress: show a tqdm progress bar.
        num_classes: expected number of logits (checked; default: taken from the model).
    """
    return _certify_run(model, images, labels, sigma, n0=n0, n=n, alpha=alpha,
                        batch_size=batch_size, seed=seed, image_keys=image_keys, device=device,
                        progress=progress, num_classes=num_classes, keep=0,
                        noise_device=noise_device).cert  # fmt: skip


def predict(
    model: Classifier,
    images,
    sigma: float,
    n: int = 10_000,
    alpha: float = 0.001,
    batch_size: int = 400,
    seed: int = 0,
    image_keys=None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    num_classes: int | None = None,
    noise_device: str | None = None,
) -> np.ndarray:
    """PREDICT of Cohen et al.: the smoothed classifier's class per image, -1 = abstain.

    Counts the base classifier's classes on ``n`` noisy copies (predict stream); returns the
    top class ``c1`` unless the two-sided binomial test of ``n_c1`` against ``n_c1 + n_c2`` at
    p = 1/2 (``scipy.stats.binomtest``) has p-value > alpha. The answer differs from the smoothed
    classifier's with probability at most alpha.
    """
    check_params(sigma, alpha, None, n, batch_size)
    sigma, alpha = float(sigma), float(alpha)
    images, _ = check_images(images)
    keys = _keys(image_keys, len(images))
    noise = NoiseSource(sigma, seed, device=noise_device or "cpu")
    jobs = [(i, STREAM_PREDICT, int(n), 0) for i in range(len(images))]
    res = sample_counts(
        model,
        images,
        keys,
        jobs,
        noise,
        batch_size=int(batch_size),
        device=device,
        num_classes=num_classes,
        progress=progress,
        desc="predict",
    )
    out = np.full(len(images), -1, dtype=np.int64)
    for i, row in enumerate(res.counts):
        top = np.argsort(row, kind="stable")[::-1][:2]
        c1 = int(row[top[0]])
        c2 = int(row[top[1]]) if len(top) > 1 else 0
        if binomtest(c1, c1 + c2, 0.5).pvalue <= alpha:
            out[i] = int(top[0])
    return out
