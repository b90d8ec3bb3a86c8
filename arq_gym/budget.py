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
  so the finished policy always fits and never needs a correction. With separate weight and
  activation bits (``bits_mode="wa"``) the larger of the two is lowered first (activations on
  a tie).

``keep_first_last`` (bits or None) pins the first and last quantizable layers at that many
bits for weights and activations; pinned layers are never lowered and count at their pinned
bits in every cost. A budget below the cost of the all-minimum policy, or above 1 (more than the
FP32 network costs), raises :class:`BudgetError` (:func:`check_feasible`); a budget at or above
the cost of the largest allowed policy (:func:`max_policy`) constrains nothing, which
:func:`unconstrained_budget_message` detects and :class:`~arq_gym.problem.QuantizationProblem`
warns about once (:class:`BudgetWarning`).
"""

from __future__ import annotations

import math
import numbers
import warnings
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


class BudgetWarning(UserWarning):
    """The budget constrains nothing: every allowed policy fits it; one-line message."""


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
    if budget > 1:
        raise BudgetError(
            f"budget {budget:.6g} is above 1: it is a fraction of the FP32 network's BOPs "
            "(1 = the FP32 cost, 1/64 = uniform W4A4), so it must be in (0, 1]"
        )
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


def max_policy(
    num_layers: int, bits: Sequence[int] = (2, 8), keep_first_last: int | None = 8
) -> Policy:
    """The most expensive allowed policy: every layer at the maximum, pinned layers at their
    bits."""
    _, hi = check_bits_range(bits)
    b = [hi] * num_layers
    for i, p in pinned_layers(num_layers, keep_first_last).items():
        b[i] = p
    return Policy.from_bits(b)


def max_bops(
    layers: Sequence[LayerInfo], bits: Sequence[int] = (2, 8), keep_first_last: int | None = 8
) -> int:
    """BOPs of :func:`max_policy`: no allowed policy costs more."""
    p = max_policy(len(layers), bits, keep_first_last)
    return sum(int(lay.macs) * w * a for lay, w, a in zip(layers, p.w_bits, p.a_bits))


def unconstrained_budget_message(
    layers: Sequence[LayerInfo],
    budget: float,
    bits: Sequence[int] = (2, 8),
    keep_first_last: int | None = 8,
) -> str | None:
    """A one-line explanation if ``budget`` is at or above the cost of :func:`max_policy` (so
    every allowed policy fits and the budget constrains nothing), else None."""
    limit = _limit(layers, budget)
    _, hi = check_bits_range(bits)
    largest = max_bops(layers, bits, keep_first_last)
    if largest > limit:
        return None
    frac = largest / fp32_bops(layers)
    pin = "" if keep_first_last is None else f", first/last layers at {keep_first_last}"
    return (
        f"budget {budget:.6g} of FP32 BOPs constrains nothing: the largest allowed policy "
        f"(every layer at {hi} bits{pin}) costs {float(frac):.6g}; pass a smaller budget "
        f"(e.g. 1/64, uniform W4A4) for a constrained search"
    )


def warn_if_unconstrained(
    layers: Sequence[LayerInfo],
    budget: float,
    bits: Sequence[int] = (2, 8),
    keep_first_last: int | None = 8,
    stacklevel: int = 1,
) -> bool:
    """Issue a :class:`BudgetWarning` if ``budget`` constrains nothing; return whether it did.

    ``stacklevel`` 1 attributes the warning to the caller of this function."""
    message = unconstrained_budget_message(layers, budget, bits, keep_first_last)
    if message is not None:
        warnings.warn(message, BudgetWarning, stacklevel=stacklevel + 1)
    return message is not None


def check_feasible(
    layers: Sequence[LayerInfo],
    budget: float,
    bits: Sequence[int] = (2, 8),
    keep_first_last: int | None = 8,
) -> None:
    """Raise :class:`BudgetError` if even the all-minimum policy costs more than ``budget`` or
    ``budget`` is not in (0, 1]."""
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
    requested: int | tuple[int, int],
    spent_bops: int,
    layers: Sequence[LayerInfo],
    budget: float,
    bits: Sequence[int] = (2, 8),
    keep_first_last: int | None = 8,
) -> int | tuple[int, int]:
    """Bits for layer ``layer_index`` under the "clip" rule.

    ``spent_bops`` is the cost of layers ``0 .. layer_index-1`` as already chosen. With one
    requested bit-width (weights = activations, ``bits_mode="tied"``) returns the largest
    bit-width ``<= requested`` (clipped into ``bits``) such that this layer plus the remaining
    layers at their minimum (pinned layers at their pinned bits) fit the budget. With a
    ``(w_bits, a_bits)`` pair (``bits_mode="wa"``) returns a pair: both clipped into ``bits``,
    then, while the layer does not fit, one bit less for the activations if they have at least
    as many bits as the weights, else for the weights. A pinned layer gets its pinned bits. If
    nothing fits (only when earlier steps ignored this rule) the minimum is returned.
    """
    lo, hi = check_bits_range(bits)
    n = len(layers)
    if not 0 <= layer_index < n:
        raise ValueError(f"layer_index {layer_index} is outside [0, {n - 1}]")
    pinned = pinned_layers(n, keep_first_last)
    pair = isinstance(requested, (tuple, list))
    if layer_index in pinned:
        p = pinned[layer_index]
        return (p, p) if pair else p
    limit = _limit(layers, budget)
    rest = sum(int(layers[j].macs) * pinned.get(j, lo) ** 2 for j in range(layer_index + 1, n))
    m = int(layers[layer_index].macs)
    if not pair:
        b = min(max(int(requested), lo), hi)
        while b > lo and spent_bops + m * b * b + rest > limit:
            b -= 1
        return b
    w, a = (min(max(int(r), lo), hi) for r in requested)
    while (w > lo or a > lo) and spent_bops + m * w * a + rest > limit:
        if a >= w and a > lo:
            a -= 1
        else:
            w -= 1
    return w, a


def enforce_clip(
    requested_bits: Sequence[int] | Policy,
    layers: Sequence[LayerInfo],
    budget: float,
    bits: Sequence[int] = (2, 8),
    keep_first_last: int | None = 8,
) -> Policy:
    """Apply :func:`clip_bits` step by step: to one requested bit-width per layer, or to the
    ``(w_bits, a_bits)`` pairs of a :class:`Policy` (a policy with equal weight and activation
    bits everywhere is clipped as one bit-width per layer)."""
    policy = (requested_bits if isinstance(requested_bits, Policy)
              else Policy.from_bits(requested_bits))  # fmt: skip
    if len(policy) != len(layers):
        raise ValueError(
            f"{len(policy)} requested bit-widths but the model has {len(layers)} "
            "quantizable layers"
        )
    lo, hi = check_bits_range(bits)
    _check_requested(policy, layers, lo, hi, pinned_layers(len(layers), keep_first_last))
    check_feasible(layers, budget, bits, keep_first_last)
    tied = policy.w_bits == policy.a_bits
    spent, w_out, a_out = 0, [], []
    for i, (w, a) in enumerate(zip(policy.w_bits, policy.a_bits)):
        got = clip_bits(i, w if tied else (w, a), spent, layers, budget, bits, keep_first_last)
        w, a = (got, got) if tied else got
        w_out.append(w)
        a_out.append(a)
        spent += int(layers[i].macs) * w * a
    return Policy(tuple(w_out), tuple(a_out))


def enforce_budget(
    requested: Policy | Sequence[int],
    layers: Sequence[LayerInfo],
    budget: float,
    mode: str = "haq",
    bits: Sequence[int] = (2, 8),
    keep_first_last: int | None = 8,
) -> Policy:
    """Enforce ``budget`` with ``mode`` ("haq" or "clip") on a policy or one bit-width per layer.

    "clip" takes one bit-width per layer or a :class:`Policy` (separate weight and activation
    bits, see :func:`enforce_clip`).
    """
    if mode not in BUDGET_MODES:
        raise ValueError(f"unknown budget_mode {mode!r}; known: {', '.join(BUDGET_MODES)}")
    if mode == "haq":
        if not isinstance(requested, Policy):
            requested = Policy.from_bits(requested)
        return enforce_haq(requested, layers, budget, bits, keep_first_last)
    return enforce_clip(requested, layers, budget, bits, keep_first_last)


def parse_budget(text: str | float) -> float:
    """A budget as a fraction of the FP32 BOPs from ``"1/64"``, ``"0.015625"`` or a number;
    :class:`BudgetError` (one line) unless it is in (0, 1]."""
    try:
        value = float(Fraction(str(text).strip()))
    except (ValueError, ZeroDivisionError):
        raise BudgetError(f"budget {text!r} is not a fraction such as 1/64 or 0.015625") from None
    if not (math.isfinite(value) and 0 < value <= 1):
        raise BudgetError(f"budget must be a fraction of the FP32 BOPs in (0, 1], got {text!r}")
    return value
