"""The reference quantizers, the definition of the quantized network: symmetric per-channel
weights (:func:`quantize_weight`) and per-tensor input activations (:class:`ActivationQuantizer`)."""

from __future__ import annotations

import torch
from torch import nn

from arq_gym.policy import FLOAT_BITS

__all__ = ["ActivationQuantizer", "activation_qrange", "quantize_weight"]


def quantize_weight(w: torch.Tensor, bits: int, per_channel: bool = True) -> torch.Tensor:
    """Symmetric fake-quantized copy of a weight tensor (axis 0 = output channel).

    ``bits`` in [2, 8]; at most ``2^bits - 1`` distinct values per output channel.
    """
    qmax = 2 ** (bits - 1) - 1
    w = w.detach()
    if per_channel:
        amax = w.abs().reshape(w.shape[0], -1).amax(dim=1).float().clamp_min(1e-12)
        zero = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
        return torch.fake_quantize_per_channel_affine(w, amax / qmax, zero, 0, -qmax, qmax)
    amax = float(w.abs().max().clamp_min(1e-12))
    return torch.fake_quantize_per_tensor_affine(w, amax / qmax, 0, -qmax, qmax)


def activation_qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range of a ``bits``-bit activation: symmetric narrow if signed, else [0, 2^b-1]."""
    if signed:
        q = 2 ** (bits - 1) - 1
        return -q, q
    return 0, 2**bits - 1


class ActivationQuantizer(nn.Module):
    """Per-tensor fake quantizer of a layer's input, run as the layer's forward pre-hook.

    ``ranges[bits]`` is the calibrated clipping range for each bit-width in [2, 8].
    :meth:`set_bits` precomputes the scale and zero-point tensors; 32 disables it.
    """

    def __init__(self, signed: bool, ranges: dict[int, float]):
        super().__init__()
        self.signed = bool(signed)
        self.ranges = {int(b): float(r) for b, r in ranges.items()}
        self.bits = FLOAT_BITS
        self.enabled = False  # a bool, not the bits: torch.compile guards on it, not on bits
        self.qmin, self.qmax = 0, 0
        # the clamp bounds as tensors too, so that a compiled graph serves every bit-width
        self.register_buffer("qlo", torch.zeros(()), persistent=False)
        self.register_buffer("qhi", torch.zeros(()), persistent=False)
        self.register_buffer("scale", torch.ones(()), persistent=False)
        self.register_buffer("inv_scale", torch.ones(()), persistent=False)
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32), persistent=False)

    def set_bits(self, bits: int) -> None:
        """Use ``bits`` from now on (32 = pass through)."""
        self.bits = int(bits)
        self.enabled = self.bits != FLOAT_BITS
        if not self.enabled:
            return
        self.qmin, self.qmax = activation_qrange(self.bits, self.signed)
        self.qlo.fill_(self.qmin)
        self.qhi.fill_(self.qmax)
        r = max(self.ranges[self.bits], 1e-8)
        self.scale.fill_(r / self.qmax)
        # float32 reciprocal, as torch's fake-quantize kernel computes it (1.0f / scale)
        self.inv_scale.copy_(torch.ones_like(self.scale) / self.scale)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """The integers ``clamp(nearbyint(x * (1/scale)), qmin, qmax)`` as float (not scaled).

        Clamping before rounding gives the same integers (``qmin``/``qmax`` are integers and
        rounding is monotone); ``torch.round`` rounds half to even like ``std::nearbyint``.
        """
        return torch.clamp(x * self.inv_scale, self.qlo, self.qhi).round_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantized ``x``; bit-identical to ``torch.fake_quantize_per_tensor_affine(x,
        scale, 0, qmin, qmax)`` (tested) but written as multiply/clamp/round/multiply, which is
        vectorised on CPU where torch's fake-quantize kernel is not."""
        if not self.enabled:
            return x
        return self.quantize(x).mul_(self.scale)

    def pre_hook(self, module: nn.Module, args: tuple) -> tuple | None:
        """Forward pre-hook: quantize the first positional input of ``module``."""
        if not self.enabled:
            return None
        return (self.forward(args[0]), *args[1:])

    def extra_repr(self) -> str:
        return f"signed={self.signed}, bits={self.bits}"
