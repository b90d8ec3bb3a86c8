"""Budget enforcement: make a requested mixed-precision policy fit a BOPs budget.

The budget is a fraction of the FP32 reference BOPs (:func:`arq_gym.cost.fp32_bops`); uniform
W4A4 is 1/64. Comparisons are exact (the float budget is turned into a
:class:`fractions.Fraction`), so uniform W4A4 fits a budget of exactly 1/64.

Two modes:

* ``"haq"`` (:func:`enforce_haq`, HAQ, background.md section 3): after the episode, while the
  cost exceeds the budget, walk the layers from last to first lowering the activation bits,
  then the weight bits, by one (never below the minimum), re-checking the cost after each
  decrement; repeat sweeps until it fits.
* ``"clip"`` (:func:`clip_bits`, :func:`enforce_clip`): at each step the layer gets the largest
  bit-width not above the request such that the remaining layers can still fit at minimum bits,
  so the finished policy always fits and never needs a correction.

``keep_first_last`` (bits or None) pins the first and last quantizable layers at that many
bits for weights and activations; pinned layers are never lowered and count at their pinned
bits in every cost. A budget below the cost of the all-minimum policy raises
:class:`BudgetError` (:func:`check_feasible`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from fractions import Fraction
from typing import TYPE_CHECKING

from arq_gym.cost import fp32_bops
from arq_gym.policy import MAX_BITS, MIN_BITS, Policy, valid_bits

if TYPE_CHECKING:
    from arq_gym.quant import LayerInfo

BUDGET_MODES = ("haq", "clip")


class BudgetError(ValueError):
    """The budget cannot be met (or is not a valid budget); one-line message."""


def check_bits_range(bits: Sequence[int]) -> tuple[int, int]:
    """Validate a ``(min, max)`` search range inside [2, 8] and return it as a tuple."""
    try:
        lo, hi = (int(b) for b in bits)
    except (TypeError, ValueError):
        raise ValueError(f"bits must be a (min, max) pair of integers, got {bits!r}") from None
    if not MIN_BITS <= lo <= hi <= MAX_BITS:
        raise ValueError(
            f"bits range {(lo, hi)} must satisfy {MIN_BITS} <= min <= max <= {MAX_BITS}"
        )
    return lo, hi


def pinned_layers(num_layers: int, keep_first_last: int | None) -> dict[int, int]:
    """``{layer index: bits}`` of the layers pinned by ``keep_first_last`` (first and last)."""
    if keep_first_last is None:
        return {}
    if not valid_bits(keep_first_last):
        raise ValueError(
            f"keep_first_last = {keep_first_last!r} must be None, 32 or in [{MIN_BITS}, {MAX_BITS}]"
        )
    return {0: keep_first_last, num_layers - 1: keep_first_last}


def _limit(layers: Sequence[LayerInfo], budget: float) -> Fraction:
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise BudgetError(f"budget must be a number (fraction of FP32 BOPs), got {budget!r}")
    if not math.isfinite(budget) or budget <= 0:
        raise BudgetError(f"budget must be a finite fraction of FP32 BOPs > 0, got {budget!r}")
    return Fraction(budget) * fp32_bops(layers)


def min_policy(
    num_layers: int, bits: Sequence[int] = (2, 8), keep_first_last: int | None = 8
) -> Policy:
    """The cheapest allowed policy: every layer at the minimum, pinned layers at their bits."""
    lo, _ = check_bits_range(bits)
    b = [lo] * num_layers
    for i, p in pinned_layers(num_layers, keep_first_last).items():
        b[i] = p
    return Policy.from_bits(b)


def min_bops(
    layers: Sequence[LayerInfo], bits: Sequence[int] = (2, 8), keep_first_last: int | None = 8
) -> int:
    """BOPs of :func:`min_policy`."""
    p = min_policy(len(layers), bits, keep_first_last)
    return sum(int(lay.macs) * w * a for lay, w, a in zip(layers, p.w_bits, p.a_bits))


def check_feasible(
    layers: Sequence[LayerInfo],
    budget: float,
    bits: Sequence[int] = (2, 8),
    keep_first_last: int | None = 8,
) -> None:
    """Raise :class:`BudgetError` if even the all-minimum policy costs more than ``budget``."""
    limit = _limit(layers, budget)
    lo, _ = check_bits_range(bits)
    cheapest = min_bops(layers, bits, keep_first_last)
    if cheapest > limit:
        frac = cheapest / fp32_bops(layers)
        pin = "" if keep_first_last is None else f", first/last layers at {keep_first_last}"
        raise BudgetError(
            f"budget {budget:.6g} of FP32 BOPs is infeasible: the minimum achievable is "
            f"{frac:.6g} (every layer at {lo} bits{pin})"
        )


def _check_requested(policy: Policy, layers: Sequence[LayerInfo], lo: int, hi: int,
                     pinned: dict[int, int]) -> None:  # fmt: skip
    if len(policy) != len(layers):
        raise ValueError(
            f"policy has {len(policy)} layers but the model has {len(layers)} quantizable layers"
        )
    for i, (w, a) in enumerate(zip(policy.w_bits, policy.a_bits)):
        if i in pinned:
            continue
        for kind, b in (("w_bits", w), ("a_bits", a)):
            if not lo <= b <= hi:
                raise ValueError(
                    f"layer {i} ({layers[i].name}): {kind} = {b} is outside the range [{lo}, {hi}]"
                )


def enforce_haq(
    policy: Policy,
    layers: Sequence[LayerInfo],
    budget: float,
    bits: Sequence[int] = (2, 8),
    keep_first_last: int | None = 8,
) -> Policy:
    """HAQ's enforcement: pin first/last, then lower bits from the last layer to the first
    (activation, then weight, one bit at a time, re-checking after each) until the cost fits.

    Non-pinned bit-widths of ``policy`` must lie in ``bits``; the result does too and costs at
    most ``budget`` (fraction of FP32 BOPs). Raises :class:`BudgetError` if infeasible.
    """
    lo, hi = check_bits_range(bits)
    pinned = pinned_layers(len(layers), keep_first_last)
    _check_requested(policy, layers, lo, hi, pinned)
    check_feasible(layers, budget, bits, keep_first_last)
    limit = _limit(layers, budget)
    w, a = list(policy.w_bits), list(policy.a_bits)
    for i, p in pinned.items():
        w[i] = a[i] = p
    macs = [int(lay.macs) for lay in layers]
    cost = sum(m * wb * ab for m, wb, ab in zip(macs, w, a))
    while cost > limit:
        for i in reversed(range(len(layers))):
            if i in pinned:
                continue
            if a[i] > lo:
                cost -= macs[i] * w[i]  # one activation bit less
                a[i] -= 1
                if cost <= limit:
                    break
            if w[i] > lo:
                cost -= macs[i] * a[i]  # one weight bit less
                w[i] -= 1
                if cost <= limit:
                    break
    return Policy(tuple(w), tuple(a))


def clip_bits(
    layer_index: int,
    requested: int,
    spent_bops: int,
    layers: Sequence[LayerInfo],
    budget: float,
    bits: Sequence[int] = (2, 8),
    keep_first_last: int | None = 8,
) -> int:
    """Bits (weights = activations) for layer ``layer_index`` under the "clip" rule.

    ``spent_bops`` is the cost of layers ``0 .. layer_index-1`` as already chosen. Returns the
    largest bit-width ``<= requested`` (clipped into ``bits``) such that this layer plus the
    remaining layers at their minimum (pinned layers at their pinned bits) fit the budget; a
    pinned layer gets its pinned bits. If nothing fits (only when earlier steps ignored this
    rule) the minimum is returned.
    """
    lo, hi = check_bits_range(bits)
    n = len(layers)
    if not 0 <= layer_index < n:
        raise ValueError(f"layer_index {layer_index} is outside [0, {n - 1}]")
    pinned = pinned_layers(n, keep_first_last)
    if layer_index in pinned:
        return pinned[layer_index]
    limit = _limit(layers, budget)
    rest = sum(int(layers[j].macs) * pinned.get(j, lo) ** 2 for j in range(layer_index + 1, n))
    m = int(layers[layer_index].macs)
    b = min(max(int(requested), lo), hi)
    while b > lo and spent_bops + m * b * b + rest > limit:
        b -= 1
    return b


def enforce_clip(
    requested_bits: Sequence[int],
    layers: Sequence[LayerInfo],
    budget: float,
    bits: Sequence[int] = (2, 8),
    keep_first_last: int | None = 8,
) -> Policy:
    """Apply :func:`clip_bits` step by step to one requested bit-width per layer."""
    if len(requested_bits) != len(layers):
        raise ValueError(
            f"{len(requested_bits)} requested bit-widths but the model has {len(layers)} "
            "quantizable layers"
        )
    lo, hi = check_bits_range(bits)
    _check_requested(
        Policy.from_bits(requested_bits),
        layers,
        lo,
        hi,
        pinned_layers(len(layers), keep_first_last),
    )
    check_feasible(layers, budget, bits, keep_first_last)
    spent, out = 0, []
    for i, r in enumerate(requested_bits):
        b = clip_bits(i, r, spent, layers, budget, bits, keep_first_last)
        out.append(b)
        spent += int(layers[i].macs) * b * b
    return Policy.from_bits(out)


def enforce_budget(
    requested: Policy | Sequence[int],
    layers: Sequence[LayerInfo],
    budget: float,
    mode: str = "haq",
    bits: Sequence[int] = (2, 8),
    keep_first_last: int | None = 8,
) -> Policy:
    """Enforce ``budget`` with ``mode`` ("haq" or "clip") on a policy or one bit-width per layer.

    For "clip" a :class:`Policy` must have equal weight and activation bits.
    """
    if mode not in BUDGET_MODES:
        raise ValueError(f"unknown budget_mode {mode!r}; known: {', '.join(BUDGET_MODES)}")
    if mode == "haq":
        if not isinstance(requested, Policy):
            requested = Policy.from_bits(requested)
        return enforce_haq(requested, layers, budget, bits, keep_first_last)
    if isinstance(requested, Policy):
        if requested.w_bits != requested.a_bits:
            raise ValueError("budget_mode 'clip' needs equal weight and activation bits per layer")
        requested = requested.w_bits
    return enforce_clip(requested, layers, budget, bits, keep_first_last)
