"""Bit-operations (BOPs) cost model and model size (background.md section 5).

``BOPs = sum_l MACs_l * w_bits_l * a_bits_l`` over the quantizable layers, with 32 for a float
tensor; the FP32 reference prices every layer at 32 x 32. All totals are exact Python ints.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from arq_gym.policy import Policy
    from arq_gym.quant import LayerInfo

FP32_BITS = 32


def _check_len(layers: Sequence[LayerInfo], bits: Sequence[int], what: str) -> None:
    if len(bits) != len(layers):
        raise ValueError(
            f"{what} has {len(bits)} entries but the model has {len(layers)} quantizable layers"
        )


def layer_bops(layer: LayerInfo, w_bits: int, a_bits: int) -> int:
    """BOPs of one layer: ``macs * w_bits * a_bits``."""
    return int(layer.macs) * int(w_bits) * int(a_bits)


def bops(layers: Sequence[LayerInfo], w_bits: Sequence[int], a_bits: Sequence[int]) -> int:
    """Total BOPs of the layers at the given weight and activation bit-widths."""
    _check_len(layers, w_bits, "w_bits")
    _check_len(layers, a_bits, "a_bits")
    return sum(layer_bops(lay, w, a) for lay, w, a in zip(layers, w_bits, a_bits))


def total_macs(layers: Sequence[LayerInfo]) -> int:
    """Multiply-accumulates of one forward pass (one input) over the quantizable layers."""
    return sum(int(layer.macs) for layer in layers)


def fp32_bops(layers: Sequence[LayerInfo]) -> int:
    """The FP32 reference: every layer at 32 x 32 bits."""
    return total_macs(layers) * FP32_BITS * FP32_BITS


def policy_bops(layers: Sequence[LayerInfo], policy: Policy) -> int:
    """Total BOPs of ``policy`` on ``layers``."""
    return bops(layers, policy.w_bits, policy.a_bits)


def bops_fraction(layers: Sequence[LayerInfo], policy: Policy) -> float:
    """BOPs of ``policy`` as a fraction of the FP32 reference (uniform W4A4 = 1/64)."""
    return policy_bops(layers, policy) / fp32_bops(layers)


def size_bits(layers: Sequence[LayerInfo], w_bits: Sequence[int]) -> int:
    """Storage of the quantizable layers' weight tensors in bits (biases and BN not counted)."""
    _check_len(layers, w_bits, "w_bits")
    return sum(int(layer.weights) * int(w) for layer, w in zip(layers, w_bits))
