"""The quantized model: a copy of a classifier whose per-layer bit-widths are set by a policy,
running on the reference, int8 or int8-compiled backend (:class:`QuantizedModel`)."""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence

import torch
from torch import nn

from arq_gym.models.architectures import BasicBlock
from arq_gym.policy import FLOAT_BITS, MAX_BITS, MIN_BITS, Policy
from arq_gym.quant.calibration import (
    CALIBRATION_RULES,
    DEFAULT_CALIBRATION,
    MSE_SAMPLE,
    _mse_range,
    _Stats,
)
from arq_gym.quant.folding import FoldedInt8Block
from arq_gym.quant.int8 import Int8Conv2d, check_int8_kernel
from arq_gym.quant.layers import LayerInfo, find_layers
from arq_gym.quant.reference import ActivationQuantizer, quantize_weight

__all__ = ["BACKENDS", "QuantizedModel", "uniform_policy"]

BACKENDS = ("reference", "int8", "int8-compiled", "auto")



class QuantizedModel(nn.Module):
    """A fake-quantized copy of a classifier whose per-layer bit-widths are set by :meth:`apply`.

    The constructor deep-copies ``model`` once, keeps the float weights of every quantizable
    layer, attaches an :class:`ActivationQuantizer` as a forward pre-hook of each, and
    calibrates activation ranges on ``calib_images`` (float in [0, 1] or uint8, ``[N, C, H, W]``)
    plus Gaussian noise of std ``sigma`` (fixed ``seed``). The model starts in float
    (all bits 32). ``apply(policy)`` rewrites the quantized weights in place from the stored
    float weights (only layers whose weight bits changed) and sets the activation quantizers;
    no copy of the model is made. Move it with ``.to(device)`` like any module.

    ``quantization`` is the ``quantization`` record of a quantized checkpoint written by
    ``arq-gym finetune`` (:mod:`arq_gym.finetune`): its learned activation ranges replace the
    calibrated ones at the bit-widths it was fine-tuned for, so that applying
    :attr:`checkpoint_policy` gives the fine-tuned network (weights are quantized from the
    checkpoint's latent float weights by the same rule as always).
    """

    def __init__(
        self,
        model: nn.Module,
        calib_images: torch.Tensor,
        sigma: float,
        per_channel: bool = True,
        calibration: str = DEFAULT_CALIBRATION,
        percentile: float = 99.99,
        seed: int = 0,
        batch_size: int = 256,
        backend: str = "reference",
        quantization: dict | None = None,
    ):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
        if calibration not in CALIBRATION_RULES:
            raise ValueError(
                f"unknown calibration {calibration!r}; known: {', '.join(CALIBRATION_RULES)}"
            )
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        if not sigma >= 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        if calib_images.dim() < 2 or calib_images.shape[0] == 0:
            raise ValueError(
                f"calib_images must be a non-empty batch, got {tuple(calib_images.shape)}"
            )
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.per_channel = per_channel
        self.calibration = calibration
        self.sigma = float(sigma)
        device = next(iter(self.model.parameters()), torch.zeros(())).device

        images = calib_images.detach()
        images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        gen = torch.Generator().manual_seed(seed)
        noisy = images + self.sigma * torch.randn(images.shape, generator=gen)

        self.layers: list[LayerInfo] = find_layers(self.model, noisy[:1].to(device))
        modules = dict(self.model.named_modules())
        self._targets: list[nn.Module] = [modules[layer.name] for layer in self.layers]
        for i, m in enumerate(self._targets):
            self.register_buffer(f"_fp_weight_{i}", m.weight.detach().clone(), persistent=False)

        ranges, signed = self._calibrate(noisy, device, percentile, seed, batch_size)
        self.act_quant = nn.ModuleList(
            ActivationQuantizer(s, r) for s, r in zip(signed, ranges)
        ).to(device)
        for m, aq in zip(self._targets, self.act_quant):
            m.register_forward_pre_hook(aq.pre_hook)
        self.quantization = None
        if quantization:
            self._use_learned_ranges(quantization)
        n = len(self.layers)
        self._w_now = [FLOAT_BITS] * n
        self._a_now = [FLOAT_BITS] * n
        self.last_apply_seconds = 0.0
        self._parents = [self._parent_of(layer.name) for layer in self.layers]
        self._int8: list[Int8Conv2d | None] = [None] * n
        # ResNet basic blocks: (parent, attribute, block, its folded int8 form)
        self._blocks = [
            (*self._parent_of(name), m, FoldedInt8Block(m))
            for name, m in self.model.named_modules()
            if isinstance(m, BasicBlock)
        ]
        self.fold_blocks = True
        object.__setattr__(self, "_compiled", None)
        self.backend = "reference"
        self.set_backend(backend)
        # an inference model: eval from the start, so that code which restores a module's
        # training flag after using it (certify does) never puts batch norm in training mode
        self.eval()

    # ------------------------------------------------------------------ calibration
    def _calibrate(self, noisy: torch.Tensor, device: torch.device, percentile: float,
                   seed: int, batch_size: int) -> tuple[list[dict[int, float]], list[bool]]:  # fmt: skip
        n_img = noisy.shape[0]
        per_image = []
        for layer in self.layers:
            if layer.kind == "conv":
                per_image.append(layer.c_in * layer.in_h * layer.in_w)
            else:
                per_image.append(layer.macs // max(layer.c_out, 1))  # in_features * positions
        gen = torch.Generator().manual_seed(seed + 1)
        stats = [_Stats(n_img * k, percentile, MSE_SAMPLE, gen) for k in per_image]
        handles = [
            m.register_forward_pre_hook(lambda mod, args, s=s: s.update(args[0]))
            for m, s in zip(self._targets, stats)
        ]
        try:
            with torch.no_grad():
                for start in range(0, n_img, batch_size):
                    self.model(noisy[start : start + batch_size].to(device))
        finally:
            for h in handles:
                h.remove()
        ranges, signed = [], []
        for st in stats:
            is_signed = st.min < 0
            signed.append(is_signed)
            if self.calibration == "max":
                r = {b: st.absmax for b in range(MIN_BITS, MAX_BITS + 1)}
            elif self.calibration == "percentile":
                p = st.percentile_value()
                r = {b: p for b in range(MIN_BITS, MAX_BITS + 1)}
            else:
                sample = torch.cat(st.samples)
                r = {
                    b: _mse_range(sample, st.absmax, b, is_signed)
                    for b in range(MIN_BITS, MAX_BITS + 1)
                }
            ranges.append(r)
        return ranges, signed

    def _use_learned_ranges(self, record: dict) -> None:
        """Take a quantized checkpoint's ``quantization`` record (:mod:`arq_gym.finetune`):
        its learned activation ranges replace the calibrated ones at the bits it was trained
        for, with its signedness; other bit-widths keep their calibrated ranges."""
        names = record.get("layers")
        if names is not None and list(names) != [layer.name for layer in self.layers]:
            raise ValueError("the checkpoint's quantization record names other layers than the "
                             "model has")  # fmt: skip
        a_bits, ranges = record["a_bits"], record["act_ranges"]
        signed = record.get("act_signed") or [None] * len(ranges)
        if not len(a_bits) == len(ranges) == len(self.layers):
            raise ValueError(f"the quantization record covers {len(ranges)} layers, the model "
                             f"has {len(self.layers)}")  # fmt: skip
        for aq, b, r, s in zip(self.act_quant, a_bits, ranges, signed):
            if r is None or b == FLOAT_BITS:
                continue
            if s is not None:
                aq.signed = bool(s)
            aq.ranges[int(b)] = float(r)
        self.quantization = dict(record)

    @property
    def checkpoint_policy(self) -> Policy | None:
        """The policy a quantized checkpoint was fine-tuned for (None for a base model)."""
        if not self.quantization:
            return None
        return Policy(tuple(self.quantization["w_bits"]), tuple(self.quantization["a_bits"]))

    # ------------------------------------------------------------------ policies
    @property
    def num_layers(self) -> int:
        """Number of quantizable layers."""
        return len(self.layers)

    @property
    def policy(self) -> Policy:
        """The policy currently applied (all 32 = float until :meth:`apply` is called)."""
        return Policy(tuple(self._w_now), tuple(self._a_now))

    def fp_weight(self, index: int) -> torch.Tensor:
        """The stored float weight of quantizable layer ``index``."""
        return getattr(self, f"_fp_weight_{index}")

    def apply(self, policy: Policy) -> QuantizedModel:
        """Quantize to ``policy`` in place (weights re-materialised from the float copies);
        returns ``self``. ValueError (one line, naming the layer) for a bad policy."""
        t0 = time.perf_counter()
        policy.check(self.layers)
        with torch.no_grad():
            for i, (wb, ab) in enumerate(zip(policy.w_bits, policy.a_bits)):
                if wb != self._w_now[i]:
                    fp = self.fp_weight(i)
                    w = fp if wb == FLOAT_BITS else quantize_weight(fp, wb, self.per_channel)
                    self._targets[i].weight.copy_(w)
                    self._w_now[i] = wb
                if ab != self._a_now[i]:
                    self.act_quant[i].set_bits(ab)
                    self._a_now[i] = ab
            if self.backend == "int8":
                self._sync_int8()
        self.last_apply_seconds = time.perf_counter() - t0
        return self

    # ------------------------------------------------------------------ execution backends
    def _parent_of(self, name: str) -> tuple[nn.Module, str]:
        parent_name, _, attr = name.rpartition(".")
        return (self.model.get_submodule(parent_name) if parent_name else self.model), attr

    def _int8_eligible(self, i: int) -> bool:
        m = self._targets[i]
        return (
            isinstance(m, nn.Conv2d)
            and m.padding_mode == "zeros"
            and not isinstance(m.padding, str)
            and m.weight.device.type == "cpu"
        )

    def _sync_int8(self) -> None:
        """With backend int8: an :class:`Int8Conv2d` in place of every eligible conv layer
        (installed once, re-packed when its bits change); otherwise the reference layers."""
        for i, m in enumerate(self._targets):
            parent, attr = self._parents[i]
            slot = self._int8[i]
            if self.backend != "int8" or not self._int8_eligible(i):
                setattr(parent, attr, m)
                continue
            if slot is None:
                slot = self._int8[i] = Int8Conv2d(m, self.act_quant[i], self.per_channel)
            if slot.bits != (self._w_now[i], self._a_now[i]):
                slot.refresh(self._w_now[i], self._a_now[i])
            setattr(parent, attr, slot)
        for parent, attr, block, folded in self._blocks:
            c1, c2 = block.conv1, block.conv2
            ok = (
                self.fold_blocks
                and isinstance(c1, Int8Conv2d) and c1.active
                and isinstance(c2, Int8Conv2d) and c2.active and not c2.act.signed
            )  # fmt: skip
            if ok and c1.fold_bits != (c1.bits, c2.act.bits):
                c1.fold(block.bn1, c2.act)
            setattr(parent, attr, folded if ok else block)

    def set_folding(self, enabled: bool) -> QuantizedModel:
        """Whether the int8 backend folds ResNet blocks (:class:`FoldedInt8Block`; on by
        default); returns ``self``. Off, every int8 conv writes float32 (for comparisons)."""
        self.fold_blocks = bool(enabled)
        with torch.no_grad():
            self._sync_int8()
        return self

    def set_backend(self, backend: str) -> QuantizedModel:
        """Choose how quantized layers execute; returns ``self``.

        * ``"reference"``: fake quantization in float32 (activation pre-hooks, convolution of
          the fake-quantized weights), the definition of the quantized network.
        * ``"int8"``: every conv layer with weights and activations of at most 8 bits runs as
          :class:`Int8Conv2d` (exact integer sums, oneDNN, CPU only); float layers and linear
          layers stay as in the reference; ResNet blocks with both convolutions in int8 run as
          :class:`FoldedInt8Block`. It agrees with the reference up to float rounding
          (bench-speed reports the measured agreement). ValueError where the kernel is
          unavailable or inexact on this CPU (:func:`check_int8_kernel`) or the model is not
          on the CPU.
        * ``"int8-compiled"``: ``"int8"`` under :meth:`compile` (the fastest CPU path; the
          compiled graph is built on the first forward pass, a few seconds).
        * ``"auto"``: ``"int8-compiled"`` where the int8 kernel is available, else
          ``"reference"``. Callers that cannot afford a failed compilation at run time use
          :meth:`warm_up`, which falls back to eager ``"int8"`` with a warning.
        """
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
        on_cpu = all(m.weight.device.type == "cpu" for m in self._targets)
        if backend == "auto":
            backend = "int8-compiled" if on_cpu and check_int8_kernel() else "reference"
        compiled = backend == "int8-compiled"
        backend = "int8" if compiled else backend
        if backend == "int8":
            if not on_cpu:
                raise ValueError("backend 'int8' runs on the CPU only; move the model to the CPU")
            if not check_int8_kernel():
                raise ValueError("backend 'int8' is not available: this torch/CPU has no exact "
                                 "oneDNN int8 convolution")  # fmt: skip
        self.backend = backend
        with torch.no_grad():
            self._sync_int8()
        return self.compile() if compiled else self.uncompile()

    def warm_up(self, sample: torch.Tensor) -> QuantizedModel:
        """Run one forward pass on ``sample`` (a batch of the size that will be used) so that a
        compiled graph is built now; if compilation fails, warn and continue eagerly (the
        :attr:`function_id` then says so). Returns ``self``; :attr:`warmed_up` is then true
        until the next :meth:`compile`."""
        object.__setattr__(self, "_warmed_up", True)
        if not self.compiled:
            return self
        try:
            with torch.inference_mode():  # the certification's inputs are inference tensors
                self(sample.clone())
        except Exception as exc:  # inductor needs a C++ toolchain; eager int8 needs none
            import warnings

            warnings.warn(f"torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0]}"
                          "); running the int8 backend eagerly", RuntimeWarning, stacklevel=2)
            self.uncompile()
        return self

    @property
    def function_id(self) -> str:
        """Names the function this model computes: ``"fake-quant-fp32"`` (reference),
        ``"int8-exact-sums"`` (int8 backend; same quantized network, integer dot products summed
        exactly instead of in float32), ``"int8-exact-sums-folded"`` (the same for a model with
        ResNet basic blocks, whose first convolution's epilogue is folded into the integer
        convolution: :class:`FoldedInt8Block`), each with ``"-compiled"`` appended when the float
        operations around the convolutions are fused by ``torch.compile``."""
        if self.backend != "int8":
            return "fake-quant-fp32"
        name = "int8-exact-sums-folded" if self._blocks and self.fold_blocks else "int8-exact-sums"
        return name + "-compiled" if self.compiled else name

    def _apply(self, fn, *args, **kwargs):  # called by .to(), .cuda(), .float(), ...
        out = super()._apply(fn, *args, **kwargs)
        if getattr(self, "backend", "reference") == "int8" and not all(
            m.weight.device.type == "cpu" for m in self._targets
        ):
            self.set_backend("reference").uncompile()
        return out

    def compile(self, **kwargs) -> QuantizedModel:
        """Run the forward pass through ``torch.compile(self.model, **kwargs)`` from now on
        (``None``-safe: call :meth:`uncompile` to go back); returns ``self``.

        With the int8 backend the compiled graph fuses the activation quantization, batch norm,
        residual additions and ReLUs around the integer convolutions (an opaque custom op that
        reads the current packed weights), and policies that keep every layer's weights and
        activations within 2-8 bits (or keep its float sides) reuse the compiled graph: the bits
        live in buffers, not in the graph. Fused float arithmetic may round differently from
        eager PyTorch, so this is a measured-agreement path like the int8 backend itself.
        """
        object.__setattr__(self, "_compiled", torch.compile(self.model, **kwargs))
        object.__setattr__(self, "_warmed_up", False)
        return self

    @property
    def warmed_up(self) -> bool:
        """Whether :meth:`warm_up` has run since the last :meth:`compile` (always true when
        eager: there is nothing to build)."""
        return not self.compiled or getattr(self, "_warmed_up", False)

    def uncompile(self) -> QuantizedModel:
        """Back to eager execution; returns ``self``."""
        object.__setattr__(self, "_compiled", None)
        return self

    @property
    def compiled(self) -> bool:
        """Whether :meth:`compile` is in effect."""
        return self.__dict__.get("_compiled") is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compiled = self.__dict__.get("_compiled")
        if compiled is None:
            return self.model(x)
        # a dynamic batch dimension, every other size static: one graph serves every batch
        # size (the last, partial batch of a certification would otherwise compile a second
        # one), and its kernels know the channel and spatial sizes (``dynamic=True`` made
        # them generic: 5-17% slower on ResNet-20 in three paired runs)
        torch._dynamo.maybe_mark_dynamic(x, 0)
        return compiled(x)


def uniform_policy(layers: Sequence[LayerInfo] | int, bits: int,
                   keep_first_last: int | None = 8) -> Policy:  # fmt: skip
    """Shortcut for :meth:`Policy.uniform` sized to ``layers``."""
    n = layers if isinstance(layers, int) else len(layers)
    return Policy.uniform(n, bits, keep_first_last)
