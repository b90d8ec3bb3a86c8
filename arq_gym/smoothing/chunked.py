"""CERTIFY in chunks of images, each finished chunk saved: long certifications survive
interruption (``arq-gym certify --out``, ``arq-gym table``, the final evaluation of
``arq-gym search`` and ``benchmark``, the one-time IRS cache of a problem).

Also what a long certification is announced with before it starts: its forward passes
(:func:`forward_passes`), a measured rate (:func:`measure_rate`) and the time they make."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from arq_gym.files import atomic_write_text, dumps
from arq_gym.smoothing.certificate import Certificate
from arq_gym.smoothing.certify import certify

#: forward passes a chunk should hold at most (about 2-3 minutes of a ResNet-20 on 2 cores), so
#: an interrupt loses little; see :func:`auto_chunk`
CHUNK_FORWARD_PASSES = 250_000


def auto_chunk(n0: int, n: int, largest: int = 25) -> int:
    """Images per saved chunk: as many as fit :data:`CHUNK_FORWARD_PASSES` forward passes
    (``n0 + n`` per image), between 1 and ``largest``."""
    return max(1, min(int(largest), CHUNK_FORWARD_PASSES // max(1, int(n0) + int(n))))


def forward_passes(images: int, n0: int, n: int) -> int:
    """Forward passes of CERTIFY on ``images`` images: ``n0`` selection plus ``n`` estimation
    samples each."""
    return int(images) * (int(n0) + int(n))


def measure_rate(model, images, sigma: float, batch_size: int, device="cpu",
                 repeats: int = 2) -> float:  # fmt: skip
    """Noisy images per second ``model`` classifies here, timed on ``repeats`` batches of
    ``batch_size`` noisy copies of ``images[0]`` after one untimed batch (the estimate a long
    certification is announced with; a fraction of a second)."""
    import torch

    x = images[:1].to(device)
    batch = x.expand(int(batch_size), *x.shape[1:])
    gen = torch.Generator(device="cpu").manual_seed(0)
    noise = (torch.randn(batch.shape, generator=gen) * float(sigma)).to(device)
    with torch.inference_mode():
        model(batch + noise)
        t0 = time.perf_counter()
        for _ in range(max(1, int(repeats))):
            model(batch + noise).argmax(1).cpu()
        seconds = time.perf_counter() - t0
    return max(1, int(repeats)) * int(batch_size) / max(seconds, 1e-9)


def format_duration(seconds: float) -> str:
    """``"45 s"``, ``"12 min"``, ``"3 h 20 min"`` (rounded: an estimate)."""
    seconds = float(seconds)
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    minutes = round(seconds / 60)
    if minutes < 90:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def say(message: str) -> None:
    """One line on stderr (what a long computation is about to do)."""
    print(message, file=sys.stderr, flush=True)


def _chunk_starts(total: int, chunk: int) -> range:
    return range(0, total, chunk)


def chunks_done(parts_dir: str | os.PathLike, ident: dict, total: int, chunk: int,
                image_keys=None) -> int:  # fmt: skip
    """Images of a :func:`certify_chunked` run that finished chunks in ``parts_dir`` already
    hold (what a rerun with the same arguments skips)."""
    parts_dir = Path(parts_dir)
    keys = np.arange(total) if image_keys is None else np.asarray(image_keys)
    done = 0
    for start in _chunk_starts(total, chunk):
        sl = slice(start, start + chunk)
        if _read_part(parts_dir / f"{start:06d}.json", ident, keys[sl]) is not None:
            done += len(keys[sl])
    return done


def chunks_done_irs(parts_dir: str | os.PathLike, image_keys, chunk: int) -> int:
    """Images that finished chunks of a :func:`build_irs_cache_chunked` run in ``parts_dir``
    hold (by their image keys; the settings are checked when the build reads them)."""
    from arq_gym.smoothing.incremental import IRSCache

    keys = np.asarray(image_keys)
    done = 0
    for start in _chunk_starts(len(keys), chunk):
        path = Path(parts_dir) / f"{start:06d}.npz"
        if path.is_file():
            with contextlib.suppress(Exception):
                if np.array_equal(IRSCache.load(path).image_keys, keys[start : start + chunk]):
                    done += len(keys[start : start + chunk])
    return done


def _read_part(path: Path, ident: dict, keys: np.ndarray) -> Certificate | None:
    if not path.is_file():
        return None
    with contextlib.suppress(Exception):
        doc = json.loads(path.read_text())
        if doc.get("ident") == ident and doc.get("image_keys") == keys.tolist():
            return Certificate.from_dict(doc["certificate"])
    return None


def certify_chunked(
    model,
    images,
    labels,
    sigma: float,
    *,
    parts_dir: str | os.PathLike,
    ident: dict,
    chunk: int = 25,
    image_keys=None,
    progress: bool = True,
    desc: str = "certify",
    on_chunk: Callable[[int, int], None] | None = None,
    **certify_kwargs,
) -> Certificate:
    """:func:`~arq_gym.smoothing.certify` of ``chunk`` images at a time; every finished chunk
    is written to ``parts_dir`` (one JSON file each) and reused by a rerun with the same
    ``ident`` (a dict naming everything the result depends on: model, network, settings).

    The noise of image ``i`` depends only on the seed and ``image_keys[i]`` (see
    :class:`~arq_gym.smoothing.NoiseSource`), so the result equals one :func:`certify` call over
    all images with the same ``image_keys`` (default ``0..N-1``); ``seconds`` is the sum over
    chunks, including those of earlier runs. ``certify_kwargs`` go to :func:`certify`.
    ``on_chunk(done, total)`` is called after each chunk is saved (or found saved).
    """
    from tqdm.auto import tqdm

    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    parts_dir = Path(parts_dir)
    labels = np.asarray(labels)
    keys = np.arange(len(labels)) if image_keys is None else np.asarray(image_keys)
    parts = []
    bar = tqdm(total=len(labels), desc=desc, unit="img", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)  # fmt: skip
    try:
        for start in _chunk_starts(len(labels), chunk):
            sl = slice(start, start + chunk)
            path = parts_dir / f"{start:06d}.json"
            part = _read_part(path, ident, keys[sl])
            if part is None:
                with torch.inference_mode():
                    part = certify(model, images[sl], labels[sl], sigma, image_keys=keys[sl],
                                   progress=False, **certify_kwargs)  # fmt: skip
                doc = {"ident": ident, "image_keys": keys[sl].tolist(), "certificate": part.to_dict()}
                atomic_write_text(path, dumps(doc))
            parts.append(part)
            bar.update(len(part))
            if on_chunk is not None:
                on_chunk(start + len(part), len(labels))
    finally:
        bar.close()
    return Certificate.concatenate(parts)


def build_irs_cache_chunked(
    model,
    images,
    labels,
    sigma: float,
    *,
    parts_dir: str | os.PathLike,
    chunk: int = 25,
    image_keys=None,
    on_chunk: Callable[[int, int], None] | None = None,
    **build_kwargs,
):
    """:func:`~arq_gym.smoothing.build_irs_cache` of ``chunk`` images at a time, every finished
    chunk saved in ``parts_dir`` (an IRS cache file each) and reused by a rerun with the same
    arguments, so that an interrupted build loses at most one chunk.

    The noise of an image depends only on the seed and its key, so the cache equals one built
    in a single call (``seconds`` and ``forward_passes`` are summed over chunks, including
    those of earlier runs). ``build_kwargs`` go to ``build_irs_cache`` (``checkpoint_sha256``
    and ``data_sha256`` name the whole subset). The caller removes ``parts_dir`` once the
    cache is saved.
    """
    from arq_gym.smoothing.incremental import IRSCache, images_sha256

    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    parts_dir = Path(parts_dir)
    labels = np.asarray(labels)
    keys = np.arange(len(labels)) if image_keys is None else np.asarray(image_keys)
    # what a saved chunk must have been built with (besides its own images and keys)
    ident = {k: v for k, v in build_kwargs.items() if k not in ("progress", "device", "batch_size")}
    ident = json.loads(json.dumps({**ident, "sigma": float(sigma)}, default=str))
    from tqdm.auto import tqdm

    progress = bool(build_kwargs.pop("progress", True))
    bar = tqdm(total=len(labels), desc="certify FP32 (IRS cache)", unit="img",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)  # fmt: skip
    try:
        parts = _irs_parts(model, images, labels, sigma, keys, parts_dir, chunk, ident, bar,
                           on_chunk, build_kwargs)  # fmt: skip
    finally:
        bar.close()
    first = parts[0]
    meta = dict(first.meta)
    meta.pop("chunk_ident", None)
    meta["images_sha256"] = images_sha256(images)
    meta["forward_passes"] = int(sum(int(p.meta["forward_passes"]) for p in parts))
    meta["seconds"] = float(sum(float(p.meta["seconds"]) for p in parts))
    meta["num_classes"] = max(int(p.meta["num_classes"]) for p in parts)
    width = meta["num_classes"]

    def counts(p):  # a chunk whose model never output the last classes has fewer columns
        c = np.asarray(p.counts)
        return np.pad(c, ((0, 0), (0, width - c.shape[1]))) if c.shape[1] < width else c

    return IRSCache(
        c_a=np.concatenate([p.c_a for p in parts]),
        pa_lower=np.concatenate([p.pa_lower for p in parts]),
        counts_a=np.concatenate([p.counts_a for p in parts]),
        counts=np.concatenate([counts(p) for p in parts]),
        predictions=np.concatenate([p.predictions for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        image_keys=np.concatenate([p.image_keys for p in parts]),
        meta=meta,
        built=True,
    )


def _irs_parts(model, images, labels, sigma, keys, parts_dir, chunk, ident, bar, on_chunk,
               build_kwargs) -> list:  # fmt: skip
    from arq_gym.smoothing.incremental import IRSCache, build_irs_cache

    parts = []
    for start in _chunk_starts(len(labels), chunk):
        sl = slice(start, start + chunk)
        path = parts_dir / f"{start:06d}.npz"
        part = None
        if path.is_file():
            with contextlib.suppress(Exception):
                cached = IRSCache.load(path)
                if (cached.meta.get("chunk_ident") == ident
                        and np.array_equal(cached.image_keys, keys[sl])):  # fmt: skip
                    part = cached
        if part is None:
            with torch.inference_mode():
                part = build_irs_cache(model, images[sl], labels[sl], sigma, image_keys=keys[sl],
                                       progress=False, **build_kwargs)  # fmt: skip
            part.meta["chunk_ident"] = ident
            part.save(path)
        parts.append(part)
        bar.update(len(part))
        if on_chunk is not None:
            on_chunk(start + len(part), len(labels))
    return parts
