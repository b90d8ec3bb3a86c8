"""A user's own model and data as a quantization problem.

``gym.make("ARQ-Custom-v0", model=..., data=..., sigma=...)`` (or :func:`arq_gym.problem.
make_problem` with the same keywords) searches a network arq-gym does not ship:

``model``
    an ``nn.Module`` (images in [0, 1] in, class scores out, normalisation inside), or a string
    ``"package.module:factory"`` naming a callable that returns one with no arguments (a class
    or a function; importable in worker processes too, which an instance only is when it
    pickles). The network should be trained with Gaussian noise at ``sigma``: what gets
    certified is its smoothed classifier.

``data``
    the images, stored as uint8 (0-255) like every dataset in arq-gym:

    * a pair ``(images, labels)`` of arrays or tensors: images ``[N, C, H, W]``, ``[N, H, W,
      C]`` (C of 1 or 3) or ``[N, H, W]`` as uint8, or floats in [0, 1]; integer labels ``[N]``;
    * a ``torch.utils.data.Dataset`` of ``(image, label)`` with ``[C, H, W]`` image tensors
      (uint8, or floats in [0, 1] such as ``ToTensor`` gives);
    * a mapping ``{"train": ..., "val": ..., "test": ...}`` of either, when the splits exist.

    One pair or dataset is split by a seeded permutation: 20% ``train`` (activation-range
    calibration draws from it), 40% ``val`` (the search fidelities certify it) and 40% ``test``
    (``fidelity="paper"`` and final certificates). Classes are ``0 .. max(label)``.

The problem is keyed by the sha256 of the model's state dict and of the data, so IRS caches and
evaluation caches are reused exactly when both are the same. Layers the quantizer cannot handle
(convolutions other than 2-D, transposed convolutions, recurrent and attention layers) are
refused with one line; the quantizer handles ``nn.Conv2d`` (any groups, depthwise included) and
``nn.Linear``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from arq_gym.data.core import DatasetInfo, Split, Splits

__all__ = ["CUSTOM_DATASET", "check_quantizable", "is_custom", "load_custom", "resolve_model",
           "splits_from_data"]  # fmt: skip

CUSTOM_DATASET = "custom"
#: share of one given pair/dataset put in each split (train, val, test)
SPLIT_FRACTIONS = (0.2, 0.4, 0.4)
#: layer types that hold weights the quantizer would silently leave in float
UNSUPPORTED = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
               nn.Bilinear, nn.RNNBase, nn.MultiheadAttention)  # fmt: skip


def resolve_model(model: Any) -> tuple[nn.Module, str]:
    """``(module, name)`` for an ``nn.Module`` or a ``"package.module:factory"`` string."""
    if isinstance(model, nn.Module):
        return model, type(model).__name__.lower()
    if not isinstance(model, str) or ":" not in model:
        raise ValueError(f"model must be an nn.Module or 'package.module:factory', got {model!r}")
    mod_name, _, attr = model.partition(":")
    try:
        factory = importlib.import_module(mod_name)
        for part in attr.split("."):
            factory = getattr(factory, part)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot import model factory {model!r}: {exc}") from None
    if not callable(factory):
        raise ValueError(f"model factory {model!r} is not callable")
    net = factory()
    if not isinstance(net, nn.Module):
        raise ValueError(f"model factory {model!r} returned {type(net).__name__}, not an nn.Module")
    return net, model


def check_quantizable(model: nn.Module) -> None:
    """Raise ValueError (one line) naming the first layer the quantizer cannot handle."""
    for name, mod in model.named_modules():
        if isinstance(mod, UNSUPPORTED):
            raise ValueError(
                f"layer {name!r} ({type(mod).__name__}) cannot be quantized by arq-gym, which "
                "quantizes nn.Conv2d and nn.Linear layers; replace it or keep it out of the model"
            )


def _as_uint8_images(x: Any) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], [N, H, W, C] or [N, H, W], got shape "
                         f"{tuple(arr.shape)}")  # fmt: skip
    if arr.shape[1] not in (1, 3) and arr.shape[-1] in (1, 3):
        arr = arr.transpose(0, 3, 1, 2)
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"images must be uint8 or floats in [0, 1], got dtype {arr.dtype}")
    if arr.size and (np.nanmin(arr) < 0 or np.nanmax(arr) > 1 or np.isnan(arr).any()):
        raise ValueError("float images must lie in [0, 1] (arq-gym adds the noise to [0, 1] "
                         "images; normalise inside the model)")  # fmt: skip
    return np.ascontiguousarray(np.rint(arr * 255.0).astype(np.uint8))


def _as_labels(y: Any, n: int) -> np.ndarray:
    arr = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if arr.shape != (n,) or not np.issubdtype(arr.dtype, np.integer) or (n and arr.min() < 0):
        raise ValueError(f"labels must be {n} non-negative integers, got shape {arr.shape} "
                         f"dtype {arr.dtype}")  # fmt: skip
    return arr.astype(np.int64)


def _to_split(source: Any, what: str) -> Split:
    if isinstance(source, torch.utils.data.Dataset) or (
        hasattr(source, "__getitem__") and hasattr(source, "__len__")
        and not isinstance(source, (tuple, list, np.ndarray, torch.Tensor))
    ):  # fmt: skip
        if len(source) == 0:
            raise ValueError(f"data {what} is empty")
        images, labels = zip(*(source[i] for i in range(len(source))))
        x = _as_uint8_images(np.stack([np.asarray(im) for im in images]))
        return Split(x, _as_labels(np.asarray([int(v) for v in labels]), len(x)))
    if isinstance(source, (tuple, list)) and len(source) == 2:
        x = _as_uint8_images(source[0])
        return Split(x, _as_labels(source[1], len(x)))
    raise ValueError(f"data {what} must be an (images, labels) pair or a torch Dataset of "
                     f"(image, label), got {type(source).__name__}")  # fmt: skip


def splits_from_data(data: Any, seed: int = 0) -> Splits:
    """:class:`~arq_gym.data.core.Splits` of a user's data (see the module docstring)."""
    if data is None:
        raise ValueError("a custom model needs data=: an (images, labels) pair, a torch Dataset "
                         "or a {'train', 'val', 'test'} mapping of them")  # fmt: skip
    if isinstance(data, Mapping):
        missing = [k for k in ("train", "val", "test") if k not in data]
        if missing:
            raise ValueError(f"data mapping lacks {', '.join(missing)} (it needs train, val, test)")
        train, val, test = (_to_split(data[k], k) for k in ("train", "val", "test"))
    else:
        whole = _to_split(data, "")
        perm = np.random.default_rng(seed).permutation(len(whole))
        a = int(round(len(perm) * SPLIT_FRACTIONS[0]))
        b = a + int(round(len(perm) * SPLIT_FRACTIONS[1]))
        train, val, test = (whole.subset(np.sort(p)) for p in (perm[:a], perm[a:b], perm[b:]))
    shapes = {s.x.shape[1:] for s in (train, val, test)}
    if len(shapes) != 1:
        raise ValueError(f"the splits' images differ in shape: {sorted(shapes)}")
    if min(len(train), len(val), len(test)) == 0:
        raise ValueError("every split needs images (train, val and test)")
    h = hashlib.sha256()
    for s in (train, val, test):
        h.update(s.sha256().encode())
    num_classes = int(max(s.y.max() for s in (train, val, test))) + 1
    # no normalisation statistics: a user's model normalises its inputs itself
    info = DatasetInfo(CUSTOM_DATASET, tuple(str(c) for c in range(num_classes)),
                       tuple(train.x.shape[1:]), (), ())  # fmt: skip
    return Splits(name=CUSTOM_DATASET, train=train, val=val, test=test, source="user data",
                  format="arrays", sha256=h.hexdigest(), info=info)  # fmt: skip


def is_custom(model: Any, data: Any = None) -> bool:
    """Whether ``model``/``data`` describe a user's own model rather than a shipped one."""
    return data is not None or isinstance(model, nn.Module) or (
        isinstance(model, str) and ":" in model)


def load_custom(model: Any, data: Any, sigma: float | None, seed: int = 0
                ) -> tuple[nn.Module, dict, Splits]:  # fmt: skip
    """``(network, checkpoint-style metadata, splits)`` of a user's model and data, checked:
    sigma given, every layer quantizable, the network runs on the images and returns scores."""
    if sigma is None:
        raise ValueError("a custom model needs sigma=: the Gaussian noise level it was trained "
                         "with (its smoothed classifier is what gets certified)")  # fmt: skip
    model, name = resolve_model(model)
    splits = splits_from_data(data, seed=seed)
    check_quantizable(model)
    sample = torch.from_numpy(splits.val.x[:2]).float() / 255.0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(sample)
    except Exception as exc:
        raise ValueError(f"the model fails on the data's images {tuple(sample.shape[1:])}: "
                         f"{type(exc).__name__}: {exc}") from None
    finally:
        model.train(was_training)
    classes = len(splits.info.classes)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] < classes:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the model must return class scores [batch, classes >= {classes}], "
                         f"got {shape}")  # fmt: skip
    if out.shape[1] > classes:  # labels need not use every class the model scores
        splits.info = dataclasses.replace(
            splits.info, classes=tuple(str(c) for c in range(out.shape[1])))
    from arq_gym.problem import _state_sha256

    meta = {"architecture": name, "dataset": CUSTOM_DATASET, "sigma": float(sigma),
            "sha256": _state_sha256(model)}  # fmt: skip
    return model, meta, splits
