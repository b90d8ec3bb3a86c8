"""The quantization problem every search algorithm shares: model, data, budget, certifier, cache.

A :class:`QuantizationProblem` is built once per (base model, data subset, sigma, fidelity,
noise seed, budget): it finds the quantizable layers, calibrates one
:class:`~arq_gym.quant.QuantizedModel` on noisy training images, and loads (or builds once) the
IRS cache of the FP32 network's certification on the evaluation subset. Then

* :meth:`QuantizationProblem.enforce` turns requested bit-widths into a policy that fits the
  BOPs budget (``budget_mode`` "haq" or "clip", :mod:`arq_gym.budget`), and
* :meth:`QuantizationProblem.evaluate` certifies the smoothed quantized network incrementally
  (:func:`arq_gym.smoothing.certify_incremental`) and returns ``(certificate, info)``.

Evaluations are cached in memory, keyed by the enforced policy, and optionally on disk in
``cache_dir/evals/<problem key>/<policy key>.json`` (one small file per policy, written
atomically with :func:`os.replace`, so several processes can share the folder).

The environments (:mod:`arq_gym.envs`) are thin wrappers around a problem; non-RL searchers call
:func:`make_problem` with the same keyword arguments as ``gym.make`` and use the problem
directly, so all of them share one evaluation path and one cache. :func:`make_problem` keeps a
process-wide memo, so environments made with the same arguments share one problem.

Where the IRS cache is looked for: ``arq_gym/models/caches/<checkpoint sha256[:16]>_<fidelity
key>.npz`` (shipped with the package, read-only), then ``cache_dir/irs/`` when ``cache_dir`` is
given, else ``<user cache dir>/irs/`` (see :func:`arq_gym.data.user_cache_dir`). A cache whose
metadata does not match the problem is rebuilt in the writable location, never used.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import threading
import time
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from arq_gym.budget import (
    BUDGET_MODES,
    BudgetError,
    check_bits_range,
    check_feasible,
    clip_bits,
    enforce_budget,
    pinned_layers,
    warn_if_unconstrained,
)
from arq_gym.cost import bops, fp32_bops
from arq_gym.fidelity import Fidelity, get_fidelity
from arq_gym.files import atomic_write_text, json_default, portable_path
from arq_gym.models.zoo import CACHES_DIR
from arq_gym.policy import Policy, valid_bits
from arq_gym.smoothing import Certificate

__all__ = [
    "REWARDS",
    "SHIPPED_CACHE_DIR",
    "Evaluation",
    "QuantizationProblem",
    "clear_problem_memo",
    "make_problem",
    "reward_value",
    "ship_irs_cache",
]

#: reward names understood by :func:`reward_value` and the environments
REWARDS = ("acr", "certified_accuracy", "clean_accuracy", "acr_delta")
#: shipped IRS caches (package data, read-only)
SHIPPED_CACHE_DIR = CACHES_DIR
#: how many training images calibrate the activation quantizers
CALIBRATION_IMAGES = 512
EVAL_FORMAT = "arq-eval/1"


# process-wide memos: problems by construction arguments, calibrated quantized models by
# (checkpoint, sigma, device, calibration images, data); one certification at a time, since
# problems that share a quantized model re-apply their policy before certifying
_MEMO: dict[tuple, QuantizationProblem] = {}
_QUANTIZED: dict[tuple, Any] = {}
_MEMO_LOCK = threading.RLock()
_CERTIFY_LOCK = threading.RLock()


class Evaluation(NamedTuple):
    """Result of :meth:`QuantizationProblem.evaluate`; unpacks as ``certificate, info``."""

    certificate: Any  # arq_gym.smoothing.Certificate
    info: dict

    @property
    def policy(self) -> Policy:
        """The enforced policy that was certified."""
        return Policy(tuple(self.info["w_bits"]), tuple(self.info["a_bits"]))


def reward_value(name: str, certificate: Any, fp_acr: float = 0.0, radius: float = 0.25) -> float:
    """The named reward of a certificate (see :data:`REWARDS`) as a Python float."""
    if name == "acr":
        return float(certificate.acr)
    if name == "certified_accuracy":
        return float(certificate.certified_accuracy(radius))
    if name == "clean_accuracy":
        return float(certificate.clean_accuracy)
    if name == "acr_delta":
        return float(certificate.acr) - float(fp_acr)
    raise ValueError(f"unknown reward {name!r}; choose one of {', '.join(REWARDS)}")


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"unsupported device {str(device)!r}; use 'auto', 'cpu' or 'cuda'"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device 'cuda' was requested but CUDA is not available; use 'cpu' or 'auto'"
        )
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {str(device)!r}; use 'auto', 'cpu' or 'cuda'")
    return dev


def _state_sha256(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def default_batch_size(shape: Sequence[int], device_type: str, backend: str) -> int:
    """Noisy samples per forward pass for images of ``shape`` (C, H, W)."""
    # measured (bench-speed batch sweep, 2 cores): the compiled int8 path runs 1.4x faster
    # at batch 100 than at 400 (cache-resident activations); results do not depend on it
    batch = 2000 if device_type == "cuda" else (100 if backend == "int8" else 400)
    # those sizes are for 32 x 32 images; larger inputs (ImageNet's 224 x 224) get batches
    # of about as many pixels, or every batch allocates gigabytes of activations
    pixels = int(np.prod(shape))
    return max(1, batch * 3072 // max(pixels, 3072))


def _to_float(x_uint8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x_uint8)).float().div_(255.0)


class QuantizationProblem:
    """Mixed-precision quantization of one smoothed base model under a BOPs budget.

    Args:
        model: the FP32 base model (images in [0, 1], normalisation inside).
        meta: its checkpoint metadata (``architecture``, ``dataset``, ``sigma``, ``sha256``).
        splits: the dataset (:func:`arq_gym.data.load`); the evaluation subset is taken from the
            fidelity's split, the calibration images from the training split.
        sigma: noise level of the smoothed classifier (default: ``meta["sigma"]``).
        budget: BOPs budget as a fraction of the FP32 network's BOPs (1/64 = uniform W4A4), in
            (0, 1].
        bits: ``(min, max)`` bit-widths an agent may choose.
        keep_first_last: bits of the first and last layers (weights and activations), or None
            to search them too.
        budget_mode: "haq" (lower bits after the episode, HAQ) or "clip" (clip each step).
        fidelity: preset name or :class:`~arq_gym.fidelity.Fidelity` (images, n, n_p, ...).
        device: "auto", "cpu" or "cuda".
        cache_dir: folder for IRS caches and the persistent evaluation cache (None: IRS caches
            in the user cache directory, evaluations cached in memory only).
        seed: seed of the certification noise.
        calibration_images: number of training images that calibrate activation ranges.
        batch_size: noisy samples per forward pass (default 100 on CPU with an int8 backend,
            400 with the reference, 2,000 on CUDA, for 32 x 32 images; scaled down for larger
            ones to about as many pixels per batch: 8 on the CPU for 224 x 224 ImageNet).
        backend: how the quantized network executes (:meth:`arq_gym.quant.QuantizedModel.
            set_backend`): ``"auto"`` (default: int8 integer convolutions under torch.compile
            on a CPU that has them, else the float32 reference), ``"int8-compiled"``,
            ``"int8"`` or ``"reference"``. The fast paths certify the same quantized network
            with exact integer sums; bench-speed and the tests measure their agreement with
            the reference. :attr:`function_id` names the function certified, and it is part of
            the evaluation-cache key. Except with ``"reference"``, large FP32 certifications
            (the IRS cache build, :meth:`fp32_network`) run the FP32 network compiled.
        progress: show progress bars while building the IRS cache.

    Raises:
        BudgetError: the budget cannot be met even with every layer at the minimum bits, or
            it is above 1 (more than the FP32 network costs).

    Warns:
        BudgetWarning: (once per problem and budget settings) the budget is at or above the
            cost of the largest allowed policy, so it constrains nothing.
    """

    def __init__(
        self,
        model: nn.Module,
        meta: dict,
        splits: Any,
        *,
        sigma: float | None = None,
        budget: float = 1 / 64,
        bits: Sequence[int] = (2, 8),
        keep_first_last: int | None = 8,
        budget_mode: str = "haq",
        fidelity: str | Fidelity = "search",
        device: str = "cpu",
        cache_dir: str | os.PathLike | None = None,
        seed: int = 0,
        calibration_images: int = CALIBRATION_IMAGES,
        batch_size: int | None = None,
        progress: bool = False,
        backend: str = "auto",
    ) -> None:
        from arq_gym.quant import BACKENDS, QuantizedModel, find_layers
        from arq_gym.quant import calibration_images as calibration_images_of

        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.fidelity = get_fidelity(fidelity)
        self.meta = dict(meta)
        self.sigma = float(meta["sigma"] if sigma is None else sigma)
        if not (math.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"sigma must be a positive number, got {sigma!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.seed = int(seed)
        self.device = _resolve_device(device)
        requested_batch = batch_size
        self.cache_dir = None if cache_dir is None else Path(cache_dir).expanduser()
        self.progress = progress
        self.architecture = meta.get("architecture", type(model).__name__.lower())
        self.dataset = meta.get("dataset")
        self.checkpoint_sha256 = meta.get("sha256") or _state_sha256(model)

        # evaluation subset: evenly spaced images of the fidelity's split
        split = splits.split(self.fidelity.split)
        self.data_indices = self.fidelity.subset_indices(len(split))
        subset = split.subset(self.data_indices)
        self.data_sha256 = subset.sha256()
        self.images = _to_float(subset.x)
        self.labels = torch.from_numpy(np.asarray(subset.y, dtype=np.int64))
        info = getattr(splits, "info", None)
        self.num_classes = len(info.classes) if info is not None else 10

        # layers and the quantized copy, calibrated once on noisy training images
        self.model = model.to(self.device).eval()
        sample = self.images[:1].to(self.device)
        self.layers = list(find_layers(self.model, sample))
        if not self.layers:
            raise ValueError(f"model {self.architecture!r} has no quantizable conv/linear layers")
        self.calibration_images = int(calibration_images)
        qkey = (self.checkpoint_sha256, self.sigma, str(self.device), self.calibration_images,
                getattr(splits, "sha256", None) or splits.train.sha256(), backend)  # fmt: skip
        with _MEMO_LOCK:
            self.quantized = _QUANTIZED.get(qkey)
        if self.quantized is None:
            calib = calibration_images_of(splits.train, self.calibration_images, seed=0)
            # a quantized checkpoint (arq-gym finetune) brings its learned activation ranges
            self.quantized = QuantizedModel(self.model, calib, self.sigma, seed=0,
                                            quantization=self.meta.get("quantization"))  # fmt: skip
            self.quantized.to(self.device).eval()
            self.quantized.set_backend(backend if self.device.type == "cpu" else "reference")
            with _MEMO_LOCK:
                _QUANTIZED[qkey] = self.quantized

        self.batch_size = int(requested_batch or default_batch_size(
            tuple(self.images.shape[1:]), self.device.type, self.quantized.backend))
        self._configure_budget(budget, bits, keep_first_last, budget_mode)
        self._memo: dict[tuple, Any] = {}
        self.irs_cache, self.irs_cache_path = self._load_irs_cache()
        self.fp_certificate = self._fp_certificate()
        self.fp_acr = float(self.fp_certificate.acr)

    # ------------------------------------------------------------------ budget configuration

    def _configure_budget(self, budget, bits, keep_first_last, budget_mode) -> None:
        if budget_mode not in BUDGET_MODES:
            raise ValueError(f"unknown budget_mode {budget_mode!r}; choose one of "
                             f"{', '.join(BUDGET_MODES)}")  # fmt: skip
        self.bits = check_bits_range(bits)
        if keep_first_last is not None and (
            isinstance(keep_first_last, bool)
            or not isinstance(keep_first_last, (int, float, np.integer))
            or int(keep_first_last) != keep_first_last
            or not valid_bits(int(keep_first_last))
        ):
            raise ValueError(
                f"keep_first_last must be None, 32 or an integer in [2, 8], got {keep_first_last!r}"
            )
        self.keep_first_last = None if keep_first_last is None else int(keep_first_last)
        if isinstance(budget, bool) or not isinstance(budget, (int, float, Fraction)):
            raise BudgetError(f"budget must be a number (fraction of FP32 BOPs), got {budget!r}")
        self.budget = float(budget)
        self.budget_mode = budget_mode
        check_feasible(self.layers, self.budget, self.bits, self.keep_first_last)
        # once per problem/config: make_problem memoises problems by their budget settings
        warn_if_unconstrained(self.layers, self.budget, self.bits, self.keep_first_last)
        self.pinned = pinned_layers(len(self.layers), self.keep_first_last)
        self.macs = [int(layer.macs) for layer in self.layers]
        self.fp32_bops = fp32_bops(self.layers)
        self.budget_bops = Fraction(self.budget) * self.fp32_bops

    def with_options(
        self,
        budget: float | None = None,
        bits: Sequence[int] | None = None,
        keep_first_last: int | None | str = "same",
        budget_mode: str | None = None,
        cache_dir: str | os.PathLike | None | str = "same",
    ) -> QuantizationProblem:
        """A problem sharing this one's model, data, calibration, IRS cache and in-memory
        evaluation cache, with other budget settings or another ``cache_dir`` (arguments left
        out keep their current values). A new ``cache_dir`` receives a copy of the IRS cache."""
        other = copy.copy(self)
        other._configure_budget(
            self.budget if budget is None else budget,
            self.bits if bits is None else bits,
            self.keep_first_last if keep_first_last == "same" else keep_first_last,
            self.budget_mode if budget_mode is None else budget_mode,
        )
        if cache_dir != "same":
            other.cache_dir = None if cache_dir is None else Path(cache_dir).expanduser()
            if other.cache_dir is not None:
                dest = other.cache_dir / "irs" / self.irs_cache_name()
                if not dest.is_file():
                    self.irs_cache.save(dest)
                other.irs_cache_path = dest
        return other

    # ------------------------------------------------------------------ IRS cache

    def _irs_expected(self) -> dict:
        # the noise of image i is addressed by its index in the split (``image_keys``), so an
        # image gets the same noise in every subset that contains it
        f = self.fidelity
        return {
            "checkpoint_sha256": self.checkpoint_sha256,
            "data_sha256": self.data_sha256,
            "sigma": self.sigma,
            "n0": f.n0,
            "n": f.n,
            "alpha": f.alpha,
            "seed": self.seed,
            "n_p_max": f.n_p,
        }

    def irs_cache_name(self) -> str:
        """File name of this problem's IRS cache: ``<sha256[:16]>_<fidelity key>.npz``."""
        suffix = "" if self.seed == 0 else f"-seed{self.seed}"
        return f"{self.checkpoint_sha256[:16]}_{self.fidelity.key}{suffix}.npz"

    def _load_irs_cache(self):
        from arq_gym.smoothing import IRSCache, load_or_build_irs_cache

        expected = self._irs_expected()
        shipped = SHIPPED_CACHE_DIR / self.irs_cache_name()
        if shipped.is_file():
            try:
                cache = IRSCache.load(shipped)
                if not cache.mismatches(expected) and self._keys_match(cache):
                    return cache, shipped
            except Exception:  # a damaged shipped cache falls through to a rebuild
                pass
        if self.cache_dir is not None:
            root = self.cache_dir / "irs"
        else:
            from arq_gym.data import user_cache_dir

            root = user_cache_dir() / "irs"
        path = root / self.irs_cache_name()
        f = self.fidelity
        parts = path.with_name(path.name + ".parts")  # finished chunks of an interrupted build

        def build():
            from arq_gym.smoothing.chunked import auto_chunk, build_irs_cache_chunked

            chunk = auto_chunk(f.n0, f.n)
            net = self.fp32_network(len(self.images) * (f.n0 + f.n))
            self._announce_irs_build(shipped, path, parts, chunk, net)
            return build_irs_cache_chunked(
                net, self.images, self.labels, self.sigma, parts_dir=parts, chunk=chunk,
                image_keys=self.data_indices, n0=f.n0, n=f.n, alpha=f.alpha, n_p_max=f.n_p,
                seed=self.seed, batch_size=self.batch_size, device=self.device,
                progress=self.progress, checkpoint_sha256=self.checkpoint_sha256,
                data_sha256=self.data_sha256, num_classes=self.num_classes,
            )  # fmt: skip

        cache = load_or_build_irs_cache(path, expected, build)
        if not self._keys_match(cache):  # noise addressed by other image keys: rebuild
            cache = build()
            cache.save(path)
        if parts.is_dir():
            import shutil

            shutil.rmtree(parts, ignore_errors=True)
        return cache, path

    def fp32_network(self, forward_passes: int | None = None):
        """The FP32 network as certifications run it: under ``torch.compile`` on a CPU (built
        once per problem) unless the backend is ``"reference"`` or the certification makes
        fewer than 100,000 forward passes (:func:`arq_gym.models.compiled.fp32_network`); its
        ``function_id`` (``"fp32-compiled"``, else none: ``"fp32"``) names it."""
        from arq_gym.models.compiled import MIN_COMPILED_PASSES, fp32_network

        if self.quantized.backend == "reference" or (
            forward_passes is not None and forward_passes < MIN_COMPILED_PASSES
        ):
            return self.model
        net = self.__dict__.get("_fp32_compiled")
        if net is None:
            sample = self.images[:1].expand(self.batch_size, *self.images.shape[1:])
            net = self._fp32_compiled = fp32_network(self.model, sample.to(self.device))
        return net

    def _announce_irs_build(self, shipped: Path, path: Path, parts: Path, chunk: int,
                            net) -> None:  # fmt: skip
        """Say once, before the FP32 network's certification starts, what is certified, why
        (no shipped cache fits), about how long it takes here and where the cache goes."""
        from arq_gym.files import portable_path
        from arq_gym.smoothing import read_cache_meta
        from arq_gym.smoothing.chunked import (
            chunks_done_irs,
            format_duration,
            forward_passes,
            measure_rate,
            say,
        )

        f = self.fidelity
        why = "no shipped IRS cache fits this checkpoint and fidelity"
        meta = read_cache_meta(shipped) if shipped.is_file() else None
        if meta is not None and meta.get("checkpoint_sha256") == self.checkpoint_sha256:
            if meta.get("data_sha256") != self.data_sha256:
                why = (f"this copy of {self.dataset} differs from the one the shipped IRS caches "
                       f"were built from (subset sha256 {self.data_sha256[:12]}, shipped "
                       f"{str(meta.get('data_sha256'))[:12]})")  # fmt: skip
            else:
                why = "the shipped IRS cache was built with other settings (seed, n, alpha)"
        done = chunks_done_irs(parts, self.data_indices, chunk)
        todo = forward_passes(len(self.labels) - done, f.n0, f.n)
        try:
            rate = measure_rate(net, self.images, self.sigma, self.batch_size, self.device)
            eta = f"about {format_duration(todo / rate)} at {rate:,.0f} images/s measured here"
        except Exception as exc:  # noqa: BLE001 - an estimate only
            eta = f"time unknown ({type(exc).__name__})"
        resumed = f"; {done} of {len(self.labels)} images already done" if done else ""
        say(f"arq-gym: {why}: certifying the FP32 {self.architecture} (sigma {self.sigma:g}) "
            f"once on {len(self.labels)} {f.split} images of {self.dataset} with n0={f.n0:,}, "
            f"n={f.n:,}: {todo:,} forward passes, {eta}{resumed}. The cache goes to "
            f"{portable_path(path)} and later runs reuse it; an interrupted build resumes from "
            f"its last chunk of {chunk} images ({portable_path(parts)}).")  # fmt: skip

    def _keys_match(self, cache) -> bool:
        return np.array_equal(np.asarray(cache.image_keys), self.data_indices)

    def _fp_certificate(self):
        return self.irs_cache.certificate()

    # ------------------------------------------------------------------ costs and enforcement

    @property
    def num_layers(self) -> int:
        """Number of quantizable layers (steps of an episode)."""
        return len(self.layers)

    def bops(self, w_bits: Sequence[int], a_bits: Sequence[int] | None = None) -> int:
        """BOPs of a full policy (``a_bits`` defaults to ``w_bits``)."""
        return bops(self.layers, w_bits, w_bits if a_bits is None else a_bits)

    def min_bits_of(self, index: int) -> int:
        """The cheapest bit-width layer ``index`` can get (its pinned bits if pinned)."""
        return self.pinned.get(index, self.bits[0])

    def min_bops_from(self, index: int) -> int:
        """BOPs of layers ``index ..`` at their cheapest bit-widths."""
        return sum(self.macs[j] * self.min_bits_of(j) ** 2 for j in range(index, self.num_layers))

    def step_bits(self, index: int, requested: int | tuple[int, int],
                  spent_bops: int) -> int | tuple[int, int]:  # fmt: skip
        """Bits layer ``index`` gets during an episode: its pinned bits, else ``requested``
        clipped into ``bits`` and, in "clip" mode, lowered so that the rest still fits
        (``spent_bops``: cost of the layers before it). ``requested`` is one bit-width for
        weights and activations (returns an int) or a ``(w_bits, a_bits)`` pair (returns a
        pair; see :func:`arq_gym.budget.clip_bits`)."""
        if self.budget_mode == "clip" or index in self.pinned:
            return clip_bits(index, requested, spent_bops, self.layers, self.budget, self.bits,
                             self.keep_first_last)  # fmt: skip
        lo, hi = self.bits
        if isinstance(requested, (tuple, list)):
            return tuple(int(min(max(int(r), lo), hi)) for r in requested)
        return int(min(max(int(requested), lo), hi))

    def enforce(self, requested: Policy | Sequence[int]) -> Policy:
        """The policy that is certified for ``requested`` (a Policy or one bit-width per layer):
        pinned layers set, bits clipped into range, the budget enforced with ``budget_mode``."""
        if isinstance(requested, Policy):
            w, a = list(requested.w_bits), list(requested.a_bits)
        else:
            w = [int(b) for b in requested]
            a = list(w)
        if len(w) != self.num_layers:
            raise ValueError(f"policy has {len(w)} layers but the model has {self.num_layers} "
                             "quantizable layers")  # fmt: skip
        lo, hi = self.bits
        for i in range(self.num_layers):
            if i in self.pinned:
                w[i] = a[i] = self.pinned[i]
            else:
                w[i], a[i] = min(max(w[i], lo), hi), min(max(a[i], lo), hi)
        policy = Policy(tuple(w), tuple(a))
        return enforce_budget(policy, self.layers, self.budget, self.budget_mode, self.bits,
                              self.keep_first_last)  # fmt: skip

    def cost_info(self, policy: Policy) -> dict:
        """``w_bits``, ``a_bits``, ``bops``, ``bops_fraction`` and ``budget`` of a policy."""
        total = self.bops(policy.w_bits, policy.a_bits)
        return {
            "w_bits": list(policy.w_bits),
            "a_bits": list(policy.a_bits),
            "bops": int(total),
            "bops_fraction": total / self.fp32_bops,
            "budget": self.budget,
        }

    # ------------------------------------------------------------------ evaluation

    def eval_key(self) -> str:
        """Identifies everything a certificate depends on except the policy (16 hex digits)."""
        from arq_gym import __version__

        ident = {
            "format": EVAL_FORMAT,
            "version": __version__,
            "checkpoint_sha256": self.checkpoint_sha256,
            "data_sha256": self.data_sha256,
            "sigma": self.sigma,
            "fidelity": self.fidelity.to_dict(),
            "seed": self.seed,
            "device": self.device.type,
            "function": self.function_id,
            "quantizer": {
                "per_channel": self.quantized.per_channel,
                "calibration": self.quantized.calibration,
                "calibration_images": self.calibration_images,
            },
        }
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def function_id(self) -> str:
        """The function certified for a policy (:attr:`arq_gym.quant.QuantizedModel.function_id`)."""
        return self.quantized.function_id

    def _warm_up(self, policy: Policy) -> None:
        """Build a compiled graph before the first evaluation (falls back to eager with a
        warning if compilation fails), so that the evaluation key names what really runs."""
        if self.quantized.warmed_up:
            return
        self.quantized.apply(policy)
        batch = self.images[:1].expand(min(self.batch_size, 64), *self.images.shape[1:])
        self.quantized.warm_up(batch.to(self.device))

    def _eval_path(self, policy: Policy) -> Path | None:
        if self.cache_dir is None:
            return None
        name = "w" + "-".join(map(str, policy.w_bits)) + "_a" + "-".join(map(str, policy.a_bits))
        if len(name) > 180:
            name = hashlib.sha256(name.encode()).hexdigest()[:32]
        return self.cache_dir / "evals" / self.eval_key() / f"{name}.json"

    def _load_eval(self, path: Path | None, policy: Policy):
        if path is None or not path.is_file():
            return None
        try:
            doc = json.loads(path.read_text())
            if doc.get("format") != EVAL_FORMAT or doc.get("policy") != policy.to_dict():
                return None
            return Certificate.from_dict(doc["certificate"])
        except Exception:  # an unreadable entry is recomputed and overwritten
            return None

    def _certify(self, policy: Policy):
        from arq_gym.smoothing import certify_incremental

        f = self.fidelity
        self.quantized.apply(policy)
        with torch.inference_mode():
            cert = certify_incremental(
                self.quantized, self.images, self.labels, self.irs_cache, n_p=f.n_p,
                alpha_zeta=f.alpha_zeta, gamma=f.gamma, batch_size=self.batch_size,
                device=self.device, progress=False,
            )  # fmt: skip
        cert.meta["function"] = self.function_id
        return cert

    def evaluate(self, policy: Policy | Sequence[int]) -> Evaluation:
        """Enforce the budget on ``policy`` and certify the smoothed quantized network.

        Returns ``(certificate, info)``; ``info`` holds ``w_bits``, ``a_bits`` (enforced),
        ``bops``, ``bops_fraction``, ``budget``, ``acr``, ``certified_accuracy`` (radius
        string -> fraction), ``clean_accuracy``, ``abstain_rate``, ``fp_acr``, ``eval_seconds``
        and ``cache_hit``.
        """
        t0 = time.perf_counter()
        enforced = self.enforce(policy)
        key = (enforced.w_bits, enforced.a_bits)
        with _CERTIFY_LOCK:
            cert = self._memo.get(key)
            hit = cert is not None
            if cert is None:
                self._warm_up(enforced)
                path = self._eval_path(enforced)
                cert = self._load_eval(path, enforced)
                hit = cert is not None
                if cert is None:
                    cert = self._certify(enforced)
                    if path is not None:
                        doc = {"format": EVAL_FORMAT, "policy": enforced.to_dict(),
                               "certificate": cert.to_dict()}  # fmt: skip
                        atomic_write_text(path, json.dumps(doc, default=json_default))
                self._memo[key] = cert
        summary = cert.summary()
        info = self.cost_info(enforced)
        info.update(
            acr=float(summary["acr"]),
            certified_accuracy=dict(summary["certified_accuracy"]),
            clean_accuracy=float(summary["clean_accuracy"]),
            abstain_rate=float(summary["abstain_rate"]),
            fp_acr=self.fp_acr,
            eval_seconds=time.perf_counter() - t0,
            cache_hit=bool(hit),
        )
        return Evaluation(cert, info)

    def clear_memory_cache(self) -> None:
        """Forget the in-memory evaluations (shared with problems from :meth:`with_options`);
        the persistent cache in ``cache_dir`` is kept."""
        with _CERTIFY_LOCK:
            self._memo.clear()

    def reward(self, certificate: Any, name: str = "acr", radius: float = 0.25) -> float:
        """The named reward of a certificate of this problem (see :func:`reward_value`)."""
        return reward_value(name, certificate, self.fp_acr, radius)

    def describe(self) -> dict:
        """The problem's settings as a JSON-ready dict."""
        return {
            "model": self.architecture,
            "dataset": self.dataset,
            "sigma": self.sigma,
            "checkpoint_sha256": self.checkpoint_sha256,
            "data_sha256": self.data_sha256,
            "layers": self.num_layers,
            "budget": self.budget,
            "bits": list(self.bits),
            "keep_first_last": self.keep_first_last,
            "budget_mode": self.budget_mode,
            "fidelity": self.fidelity.to_dict(),
            "seed": self.seed,
            "device": str(self.device),
            "backend": self.quantized.backend + ("-compiled" if self.quantized.compiled else ""),
            "function": self.function_id,
            "fp_acr": self.fp_acr,
            "fp_clean_accuracy": float(self.fp_certificate.clean_accuracy),
            "irs_cache": portable_path(self.irs_cache_path),
        }

    def __repr__(self) -> str:
        return (f"QuantizationProblem({self.architecture}, {self.dataset}, sigma={self.sigma}, "
                f"budget={self.budget:.6g}, fidelity={self.fidelity.key!r}, "
                f"layers={self.num_layers})")  # fmt: skip


# ---------------------------------------------------------------------- make_problem + memo


def clear_problem_memo() -> None:
    """Forget every problem :func:`make_problem` has built and every calibrated quantized
    model (frees their memory; the next problem calibrates again)."""
    with _MEMO_LOCK:
        _MEMO.clear()
        _QUANTIZED.clear()


def _file_ident(path: str | os.PathLike) -> tuple:
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        from arq_gym.models import CheckpointError

        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    st = p.stat()
    return (str(p), st.st_size, st.st_mtime_ns)


def make_problem(
    model: Any = "resnet20",
    dataset: str | None = None,
    sigma: float | None = None,
    checkpoint: str | os.PathLike | None = None,
    budget: float = 1 / 64,
    bits: Sequence[int] = (2, 8),
    keep_first_last: int | None = 8,
    budget_mode: str = "haq",
    fidelity: str | Fidelity = "search",
    images: int | None = None,
    n: int | None = None,
    n_p: int | None = None,
    alpha: float | None = None,
    device: str = "auto",
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    progress: bool = True,
    backend: str = "auto",
    data: Any = None,
) -> QuantizationProblem:
    """Build (or reuse) the problem the environments' keyword arguments describe.

    The base model is the shipped one for ``(model, dataset, sigma)`` (sigma defaults to 0.25),
    or the checkpoint at ``checkpoint`` (its metadata gives architecture and dataset; ``sigma``
    defaults to the sigma it was trained with), or a user's own: ``model`` an ``nn.Module`` or
    ``"package.module:factory"`` with ``data`` and ``sigma`` (:mod:`arq_gym.custom`). Problems
    are memoised process-wide by their arguments, so the calibration and the IRS cache are built
    once per process; problems that differ only in budget settings or ``cache_dir`` share model,
    data, calibration and the in-memory evaluation cache (see
    :meth:`QuantizationProblem.with_options`).
    """
    from arq_gym.custom import is_custom, load_custom

    custom = is_custom(model, data)
    if custom:
        if checkpoint is not None:
            raise ValueError("give either checkpoint= or a custom model= with data=, not both")
        if model is None:
            raise ValueError("a custom problem needs model=: an nn.Module or "
                             "'package.module:factory'")  # fmt: skip
    elif model is None:
        raise ValueError("model= is missing: a shipped model name, an nn.Module or "
                         "'package.module:factory' (with data= and sigma=)")  # fmt: skip
    elif dataset == "imagenet" or model in ("resnet50", "mobilenet_v2"):
        from arq_gym.envs import IMAGENET_NEEDS

        for key, value in (("checkpoint", checkpoint), ("data_dir", data_dir)):
            if value is None:
                raise ValueError(f"the ImageNet benchmark ({model}) needs {key}=PATH: "
                                 f"{IMAGENET_NEEDS[key]}")  # fmt: skip
    fid = get_fidelity(fidelity, images=images, n=n, n_p=n_p, alpha=alpha)
    dev = _resolve_device(device)
    if sigma is not None and (
        isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma)
        or sigma <= 0
    ):  # fmt: skip
        raise ValueError(f"sigma must be a positive number, got {sigma!r}")
    # a user's model and data, checked and split (None: a shipped model or a checkpoint)
    custom = load_custom(model, data, sigma, seed=0) if custom else None
    if data_dir is None and os.environ.get("ARQ_GYM_DATA"):
        data_ident = os.pathsep.join(
            str(Path(part).expanduser().resolve())
            for part in os.environ["ARQ_GYM_DATA"].split(os.pathsep) if part
        )  # fmt: skip
    else:
        data_ident = None if data_dir is None else str(Path(data_dir).expanduser().resolve())
    if custom is not None:
        model_ident = ("custom", custom[1]["architecture"], custom[1]["sha256"])
        data_ident = custom[2].sha256
    elif checkpoint is not None:
        model_ident = ("checkpoint", _file_ident(checkpoint))
    else:
        model_ident = ("shipped", model, dataset, 0.25 if sigma is None else float(sigma))
    cache_ident = None if cache_dir is None else str(Path(cache_dir).expanduser().resolve())
    base_key = (model_ident, None if sigma is None else float(sigma), fid, str(dev), data_ident,
                int(seed), backend)  # fmt: skip
    bits_ident = tuple(bits) if isinstance(bits, (list, tuple)) else bits
    budget_key = repr((budget, bits_ident, keep_first_last, budget_mode, cache_ident))
    with _MEMO_LOCK:
        full = _MEMO.get((base_key, budget_key))
        if full is not None:
            return full
        base = next((p for (bk, _), p in _MEMO.items() if bk == base_key), None)
        if base is not None:
            problem = base.with_options(budget, bits, keep_first_last, budget_mode, cache_dir)
        else:
            problem = _build_problem(model, dataset, sigma, checkpoint, budget, bits,
                                     keep_first_last, budget_mode, fid, dev, data_dir, cache_dir,
                                     seed, progress, backend, custom)  # fmt: skip
        _MEMO[(base_key, budget_key)] = problem
        return problem


def _build_problem(model, dataset, sigma, checkpoint, budget, bits, keep_first_last,
                   budget_mode, fid, dev, data_dir, cache_dir, seed, progress, backend,
                   custom=None):  # fmt: skip
    from arq_gym import data as data_mod
    from arq_gym.models import load_checkpoint, load_shipped

    if custom is not None:
        net, meta, splits = custom
    else:
        if checkpoint is not None:
            net, meta = load_checkpoint(checkpoint)
            for key in ("architecture", "dataset", "sigma"):
                if key not in meta:
                    raise ValueError(f"checkpoint {checkpoint} has no {key!r} in its metadata")
            if meta["sigma"] is None and sigma is None:  # Cohen et al.'s files do not say it
                raise ValueError(f"checkpoint {checkpoint} does not record its noise level; pass "
                                 "sigma= (Cohen et al.'s folder names say it: noise_0.25)")  # fmt: skip
            if meta["sigma"] is None:
                meta["sigma"] = float(sigma)
        else:
            net, meta = load_shipped(model, dataset, 0.25 if sigma is None else float(sigma))
        splits = data_mod.load(meta["dataset"], data_dir=data_dir)
    return QuantizationProblem(
        net, meta, splits, sigma=sigma, budget=budget, bits=bits,
        keep_first_last=keep_first_last, budget_mode=budget_mode, fidelity=fid, device=str(dev),
        cache_dir=cache_dir, seed=seed, progress=progress, backend=backend,
    )  # fmt: skip


def ship_irs_cache(problem: QuantizationProblem) -> Path:
    """Copy a problem's IRS cache into the package (``arq_gym/models/caches``) so that envs
    with the same model and fidelity start without certifying (maintainers)."""
    import shutil

    SHIPPED_CACHE_DIR.mkdir(parents=True, exist_ok=True)
    dest = SHIPPED_CACHE_DIR / problem.irs_cache_name()
    if Path(problem.irs_cache_path).resolve() != dest.resolve():
        shutil.copyfile(problem.irs_cache_path, dest)
    return dest
