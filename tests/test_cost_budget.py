"""BOPs cost model (arq_gym.cost) and budget enforcement (arq_gym.budget)."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from arq_gym.budget import (
    BudgetError,
    BudgetWarning,
    check_feasible,
    clip_bits,
    enforce_budget,
    enforce_clip,
    enforce_haq,
    max_bops,
    max_policy,
    min_bops,
    unconstrained_budget_message,
    warn_if_unconstrained,
)
from arq_gym.cost import bops, bops_fraction, fp32_bops, policy_bops, size_bits, total_macs
from arq_gym.models import build
from arq_gym.policy import Policy
from arq_gym.quant import LayerInfo, find_layers


def fake_layers(macs: list[int]) -> list[LayerInfo]:
    """Synthetic layers with the given MACs (only macs/weights/name matter for costs)."""
    return [
        LayerInfo(i, f"l{i}", "conv", 1, 1, (1, 1), (1, 1), 1, False, 1, 1, 1, 1, m + 1, m)
        for i, m in enumerate(macs)
    ]


@pytest.fixture(scope="module")
def r20():
    return find_layers(build("resnet20").eval(), torch.rand(1, 3, 32, 32))


def test_uniform_fractions_exact(r20):
    assert total_macs(r20) == 40_551_040
    assert fp32_bops(r20) == 40_551_040 * 1024
    assert bops_fraction(r20, Policy.uniform(20, 4, None)) == 1 / 64
    assert bops_fraction(r20, Policy.uniform(20, 8, None)) == 1 / 16
    assert bops_fraction(r20, Policy.uniform(20, 32, None)) == 1.0
    # pinned first/last at 8 bits: 4*4 everywhere plus (64-16) on conv1 and fc
    pinned = policy_bops(r20, Policy.uniform(20, 4, 8))
    assert pinned == 16 * 40_551_040 + 48 * (442_368 + 640)


def test_bops_and_size(r20):
    layers = fake_layers([10, 20, 30])
    assert bops(layers, [2, 4, 8], [8, 4, 32]) == 10 * 16 + 20 * 16 + 30 * 256
    assert size_bits(layers, [2, 4, 32]) == 11 * 2 + 21 * 4 + 31 * 32
    assert size_bits(r20, [32] * 20) == 32 * sum(lay.weights for lay in r20)
    with pytest.raises(ValueError, match="w_bits has 2 entries but the model has 3"):
        bops(layers, [2, 4], [8, 4, 8])


layer_macs = st.lists(st.integers(0, 10**6), min_size=1, max_size=25)
bit_range = st.tuples(st.integers(2, 8), st.integers(2, 8)).map(lambda t: (min(t), max(t)))
pin = st.sampled_from([None, 8, 6, 32])


def _budget_between(layers, bits, keep, u: float) -> float:
    """A feasible budget: between the all-minimum fraction and 1 (the FP32 cost)."""
    lo = min(min_bops(layers, bits, keep) / fp32_bops(layers) * (1 + 1e-12), 1.0)  # rounding
    return lo + u * (1.0 - lo)


@settings(max_examples=200, deadline=None)
@given(macs=layer_macs, bits=bit_range, keep=pin, u=st.floats(0, 1), data=st.data())
def test_haq_fits_and_stays_in_range(macs, bits, keep, u, data):
    macs[0] = max(macs[0], 1)  # fp32 reference > 0
    layers = fake_layers(macs)
    lo, hi = bits
    n = len(layers)
    w = data.draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n))
    a = data.draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n))
    budget = _budget_between(layers, bits, keep, u)
    out = enforce_haq(Policy(tuple(w), tuple(a)), layers, budget, bits, keep)
    assert policy_bops(layers, out) <= Fraction(budget) * fp32_bops(layers)
    for i in range(n):
        if keep is not None and i in (0, n - 1):
            assert out.w_bits[i] == out.a_bits[i] == keep
        else:
            assert lo <= out.a_bits[i] <= a[i] and lo <= out.w_bits[i] <= w[i]
    assert enforce_haq(out, layers, budget, bits, keep) == out  # idempotent once it fits


@settings(max_examples=200, deadline=None)
@given(macs=layer_macs, bits=bit_range, keep=pin, u=st.floats(0, 1), data=st.data())
def test_clip_never_needs_correction(macs, bits, keep, u, data):
    macs[0] = max(macs[0], 1)
    layers = fake_layers(macs)
    lo, hi = bits
    n = len(layers)
    requested = data.draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n))
    budget = _budget_between(layers, bits, keep, u)
    limit = Fraction(budget) * fp32_bops(layers)
    spent, chosen = 0, []
    for i, r in enumerate(requested):  # as an env does, one step at a time
        b = clip_bits(i, r, spent, layers, budget, bits, keep)
        pinned = keep is not None and i in (0, n - 1)
        assert b == keep if pinned else lo <= b <= r
        chosen.append(b)
        spent += macs[i] * b * b
    policy = Policy.from_bits(chosen)
    assert spent == policy_bops(layers, policy) <= limit
    assert enforce_haq(policy, layers, budget, bits, keep) == policy  # no correction needed
    assert enforce_clip(requested, layers, budget, bits, keep) == policy


def test_clip_takes_the_largest_fitting_bits():
    layers = fake_layers([100, 100, 100])
    # budget 16/1024 of 300 MACs = 48 per MAC-unit budget (x100): three layers at 4x4 exactly
    assert clip_bits(0, 8, 0, layers, 1 / 64, (2, 8), None) == 6  # 36+4+4 <= 48 < 49+4+4
    assert clip_bits(0, 5, 0, layers, 1 / 64, (2, 8), None) == 5  # the request bounds it
    assert clip_bits(1, 8, 100 * 36, layers, 1 / 64, (2, 8), None) == 2  # 36+4+4; 36+9+4 > 48
    assert clip_bits(1, 8, 100 * 16, layers, 1 / 64, (2, 8), None) == 5  # 16+25+4 <= 48
    assert clip_bits(2, 8, 100 * 41, layers, 1 / 64, (2, 8), None) == 2
    assert clip_bits(2, 3, 0, layers, 1.0, (2, 8), 8) == 8  # a pinned layer gets its pin
    assert clip_bits(2, 3, 0, layers, 1.0, (2, 8), None) == 3  # never above the request


def test_haq_walks_from_the_last_layer():
    layers = fake_layers([100, 100, 100, 100])
    start = Policy.uniform(4, 8, None)
    # 8*8*400 = 25600 BOPs, budget 24000: a3 -> 7 (24800), w3 -> 7 (24100), a2 -> 7 (23300)
    out = enforce_haq(start, layers, 24_000 / (1024 * 400), (2, 8), None)
    assert out == Policy((8, 8, 8, 7), (8, 8, 7, 7))
    # layer 3 pinned: layer 2 pays first; one decrement fits 24950
    out = enforce_haq(start, layers, 24_950 / (1024 * 400), (2, 8), 8)
    assert out == Policy((8, 8, 8, 8), (8, 8, 7, 8))


def test_infeasible_budget(r20):
    with pytest.raises(BudgetError, match=r"minimum achievable is 0\.0039") as e:
        check_feasible(r20, 0.001, (2, 8), None)  # all 2-bit = 4/1024 = 0.0039
    assert "\n" not in str(e.value)
    check_feasible(r20, 4 / 1024, (2, 8), None)  # exactly the minimum is fine
    with pytest.raises(BudgetError, match="infeasible"):
        check_feasible(r20, 4 / 1024, (2, 8), 8)  # pinned first/last cost more
    with pytest.raises(BudgetError, match="infeasible"):
        enforce_haq(Policy.uniform(20, 4, 8), r20, 0.001)
    with pytest.raises(BudgetError, match="infeasible"):
        enforce_clip([4] * 20, r20, 0.001)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(BudgetError, match="budget must be"):
            check_feasible(r20, bad)


@pytest.mark.parametrize("budget", [2, 1.5, 1 + 1e-9])
def test_budget_above_one_is_refused(r20, budget):
    """More than the FP32 network costs is no budget: refused in one line everywhere."""
    match = r"budget .* is above 1: it is a fraction of the FP32 network's BOPs .* \(0, 1\]"
    with pytest.raises(BudgetError, match=match) as e:
        check_feasible(r20, budget)
    assert "\n" not in str(e.value)
    for call in (lambda: enforce_haq(Policy.uniform(20, 4, 8), r20, budget),
                 lambda: enforce_clip([4] * 20, r20, budget),
                 lambda: clip_bits(1, 4, 0, r20, budget),
                 lambda: unconstrained_budget_message(r20, budget)):  # fmt: skip
        with pytest.raises(BudgetError, match="above 1"):
            call()
    check_feasible(r20, 1.0)  # exactly the FP32 cost is a (useless but valid) budget


def test_largest_allowed_policy_and_unconstrained_budgets(r20):
    assert max_policy(4, (2, 6), 8) == Policy((8, 6, 6, 8), (8, 6, 6, 8))
    assert max_policy(3, (3, 5), None) == Policy.uniform(3, 5, None)
    layers = fake_layers([100, 100, 100])
    assert max_bops(layers, (2, 6), 8) == 100 * (64 + 36 + 64)
    # ResNet-20, bits (2, 8): every layer at 8 bits (pinned or not) is W8A8 = 1/16 of FP32
    assert max_bops(r20, (2, 8), 8) * 16 == fp32_bops(r20) == max_bops(r20, (2, 8), None) * 16
    assert unconstrained_budget_message(r20, 1 / 64) is None
    assert unconstrained_budget_message(r20, 0.0624) is None
    msg = unconstrained_budget_message(r20, 1 / 16)  # exactly W8A8: nothing is excluded
    assert msg == ("budget 0.0625 of FP32 BOPs constrains nothing: the largest allowed policy "
                   "(every layer at 8 bits, first/last layers at 8) costs 0.0625; pass a smaller "
                   "budget (e.g. 1/64, uniform W4A4) for a constrained search")  # fmt: skip
    assert "every layer at 8 bits)" in unconstrained_budget_message(r20, 1.0, (2, 8), None)
    # a narrower range lowers the largest policy: W4A4 everywhere costs exactly 1/64
    assert "costs 0.015625" in unconstrained_budget_message(r20, 1 / 64, (2, 4), None)
    assert unconstrained_budget_message(r20, 1 / 64, (2, 4), 8) is None  # pinned 8-bit layers
    # pinned layers count at their bits: at 32 bits the first and last layers cost more
    at32 = unconstrained_budget_message(r20, 0.9, (2, 8), 32)
    assert at32 is not None and "first/last layers at 32" in at32
    assert unconstrained_budget_message(r20, 0.07, (2, 8), 32) is None
    with pytest.warns(BudgetWarning, match="constrains nothing") as rec:
        assert warn_if_unconstrained(r20, 0.5) is True
    assert len(rec) == 1 and rec[0].filename == __file__  # attributed to the caller
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_if_unconstrained(r20, 1 / 64) is False
    # an unconstrained budget changes nothing in enforcement: the request is kept
    assert enforce_haq(Policy.uniform(20, 8, 8), r20, 1 / 16) == Policy.uniform(20, 8, 8)


def test_bad_inputs(r20):
    with pytest.raises(ValueError, match=r"layer 3 \(layer1.1.conv1\): w_bits = 9 is outside"):
        enforce_haq(Policy((4, 4, 4, 9) + (4,) * 16, (4,) * 20), r20, 1 / 64)
    with pytest.raises(ValueError, match=r"a_bits = 1 is outside the range \[2, 8\]"):
        enforce_haq(Policy((4,) * 20, (4, 1) + (4,) * 18), r20, 1 / 64)
    with pytest.raises(ValueError, match="outside the range"):
        enforce_clip([3] * 19 + [2], r20, 1 / 64, bits=(3, 8), keep_first_last=None)
    with pytest.raises(ValueError, match="policy has 19 layers but the model has 20"):
        enforce_haq(Policy.uniform(19, 4), r20, 1 / 64)
    with pytest.raises(ValueError, match="bits range"):
        enforce_haq(Policy.uniform(20, 4), r20, 1 / 64, bits=(1, 8))
    with pytest.raises(ValueError, match="keep_first_last"):
        check_feasible(r20, 1 / 64, (2, 8), keep_first_last=12)
    with pytest.raises(ValueError, match="unknown budget_mode"):
        enforce_budget([4] * 20, r20, 1 / 64, mode="greedy")


def test_enforce_budget_modes(r20):
    req = [8] * 20
    haq = enforce_budget(req, r20, 1 / 64, "haq")
    clip = enforce_budget(Policy.from_bits(req), r20, 1 / 64, "clip")
    for p in (haq, clip):
        assert bops_fraction(r20, p) <= 1 / 64
        assert p.w_bits[0] == p.w_bits[-1] == 8
    assert clip.w_bits == clip.a_bits
    # clip spends the budget greedily on the early layers
    assert clip.w_bits[1] == 8 and clip.w_bits[-2] == 2
