"""CERTIFY in chunks of images, each finished chunk saved: long certifications survive
interruption (``arq-gym certify --out``, ``arq-gym table``)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from arq_gym.files import atomic_write_text, dumps
from arq_gym.smoothing.certificate import Certificate
from arq_gym.smoothing.certify import certify


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
    **certify_kwargs,
) -> Certificate:
    """:func:`~arq_gym.smoothing.certify` of ``chunk`` images at a time; every finished chunk
    is written to ``parts_dir`` (one JSON file each) and reused by a rerun with the same
    ``ident`` (a dict naming everything the result depends on: model, network, settings).

    The noise of image ``i`` depends only on the seed and ``image_keys[i]`` (see
    :class:`~arq_gym.smoothing.NoiseSource`), so the result equals one :func:`certify` call over
    all images with the same ``image_keys`` (default ``0..N-1``); ``seconds`` is the sum over
    chunks, including those of earlier runs. ``certify_kwargs`` go to :func:`certify`.
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
        for start in range(0, len(labels), chunk):
            sl = slice(start, start + chunk)
            path = parts_dir / f"{start:06d}.json"
            part = None
            if path.is_file():
                with contextlib.suppress(Exception):
                    doc = json.loads(path.read_text())
                    if doc.get("ident") == ident and doc.get("image_keys") == keys[sl].tolist():
                        part = Certificate.from_dict(doc["certificate"])
            if part is None:
                with torch.inference_mode():
                    part = certify(model, images[sl], labels[sl], sigma, image_keys=keys[sl],
                                   progress=False, **certify_kwargs)  # fmt: skip
                doc = {"ident": ident, "image_keys": keys[sl].tolist(), "certificate": part.to_dict()}
                atomic_write_text(path, dumps(doc))
            parts.append(part)
            bar.update(len(part))
    finally:
        bar.close()
    return Certificate.concatenate(parts)
