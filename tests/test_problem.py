"""The shared quantization problem: fidelity presets, enforcement, evaluation and its caches."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from arq_gym.budget import BudgetError
from arq_gym.fidelity import FIDELITIES, Fidelity, get_fidelity
from arq_gym.policy import Policy
from arq_gym.problem import (
    REWARDS,
    QuantizationProblem,
    make_problem,
    reward_value,
)

LENET = {"model": "lenet5", "dataset": "fashion_mnist", "keep_first_last": None,
         "fidelity": "smoke", "device": "cpu"}  # fmt: skip


# ---------------------------------------------------------------------- fidelity


def test_fidelity_presets_match_the_design():
    smoke, search, paper = FIDELITIES["smoke"], FIDELITIES["search"], FIDELITIES["paper"]
    assert (smoke.images, smoke.n, smoke.n_p, smoke.split) == (16, 1_000, 100, "val")
    assert (search.images, search.n, search.n_p, search.split) == (100, 10_000, 500, "val")
    assert (paper.images, paper.n, paper.n_p, paper.split) == (500, 100_000, 10_000, "test")
    for f in (smoke, search, paper):
        assert (f.n0, f.alpha, f.alpha_zeta, f.gamma) == (100, 0.001, 0.001, 0.99)
        assert f.is_preset and f.key == f.name


def test_paper_subset_is_every_20th_test_image():
    idx = FIDELITIES["paper"].subset_indices(10_000)
    assert len(idx) == 500 and idx[0] == 0 and set(np.diff(idx)) == {20}
    val = FIDELITIES["search"].subset_indices(5_000)
    assert len(val) == 100 and set(np.diff(val)) == {50}


def test_fidelity_overrides_and_key():
    f = get_fidelity("smoke", images=8, n=500, n_p=50, alpha=0.01)
    assert (f.images, f.n, f.n_p, f.alpha, f.n0) == (8, 500, 50, 0.01, 100)
    assert not f.is_preset
    assert f.key == "smoke-images8-n500-n_p50-alpha0.01"
    assert get_fidelity("search") is FIDELITIES["search"]
    assert get_fidelity(f) is f


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fidelity": "fast"}, "unknown fidelity 'fast'; choose one of smoke, search, paper"),
        ({"fidelity": "smoke", "n_p": 2_000}, "n_p .2000. must not exceed n .1000."),
        ({"fidelity": "smoke", "images": 0}, "images must be a positive integer"),
        ({"fidelity": "smoke", "alpha": 0.7}, r"alpha must be in \(0, 0.5\)"),
    ],
)
def test_fidelity_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_fidelity(**kwargs)


def test_subset_larger_than_split_is_an_error():
    with pytest.raises(ValueError, match="asks for 100 images but the val split has only 50"):
        FIDELITIES["search"].subset_indices(50)


def test_fidelity_is_hashable_and_frozen():
    assert len({Fidelity("smoke", 16, 1000, 100), FIDELITIES["smoke"]}) == 1


# ---------------------------------------------------------------------- rewards


class _Cert:
    acr = 0.4
    clean_accuracy = 0.7

    def certified_accuracy(self, r):
        return 0.5 if r <= 0.25 else 0.1


def test_reward_values():
    c = _Cert()
    assert reward_value("acr", c) == 0.4
    assert reward_value("clean_accuracy", c) == 0.7
    assert reward_value("certified_accuracy", c, radius=0.5) == 0.1
    assert reward_value("acr_delta", c, fp_acr=0.5) == pytest.approx(-0.1)
    assert set(REWARDS) == {"acr", "certified_accuracy", "clean_accuracy", "acr_delta"}
    with pytest.raises(ValueError, match="unknown reward 'loss'; choose one of acr, "):
        reward_value("loss", c)


# ---------------------------------------------------------------------- the LeNet-5 problem


@pytest.fixture(scope="module")
def lenet(data_dir) -> QuantizationProblem:
    return make_problem(**LENET, data_dir=data_dir)


def test_problem_layers_and_costs(lenet):
    assert lenet.num_layers == 5
    assert [layer.name for layer in lenet.layers] == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    assert lenet.fp32_bops == sum(lenet.macs) * 1024
    assert lenet.bops([4] * 5) == lenet.fp32_bops // 64
    assert len(lenet.images) == 16 and lenet.images.dtype.is_floating_point
    assert float(lenet.images.min()) >= 0 and float(lenet.images.max()) <= 1
    assert lenet.data_indices.tolist() == list(range(0, 16 * 375, 375))  # 6,000 val images
    assert 0 < lenet.fp_acr <= 0.25 * 3.1
    d = lenet.describe()
    assert d["layers"] == 5 and d["fidelity"]["name"] == "smoke" and d["sigma"] == 0.25


def test_enforce_haq_fits_the_budget_and_keeps_feasible_requests(lenet):
    limit = lenet.budget * lenet.fp32_bops
    for requested in ([8] * 5, [2, 8, 2, 8, 2], [5, 6, 7, 8, 3]):
        p = lenet.enforce(requested)
        assert lenet.bops(p.w_bits, p.a_bits) <= limit
        assert all(2 <= b <= 8 for b in p.w_bits + p.a_bits)
    assert lenet.enforce([4] * 5) == Policy.uniform(5, 4, None)  # exactly the budget
    assert lenet.enforce([2, 3, 2, 3, 2]) == Policy.from_bits([2, 3, 2, 3, 2])
    with pytest.raises(ValueError, match="policy has 3 layers but the model has 5"):
        lenet.enforce([4, 4, 4])


def test_clip_mode_and_pinned_layers(lenet):
    clip = lenet.with_options(budget_mode="clip", keep_first_last=8, budget=0.05)
    assert clip.quantized is lenet.quantized and clip.irs_cache is lenet.irs_cache
    p = clip.enforce([8] * 5)
    assert p.w_bits == p.a_bits and p.w_bits[0] == 8 and p.w_bits[-1] == 8
    assert clip.bops(p.w_bits) <= 0.05 * clip.fp32_bops
    # step-by-step clipping gives the same policy as enforce
    spent, chosen = 0, []
    for i in range(5):
        b = clip.step_bits(i, 8, spent)
        chosen.append(b)
        spent += clip.macs[i] * b * b
    assert tuple(chosen) == p.w_bits
    assert lenet.budget_mode == "haq" and lenet.keep_first_last is None  # original unchanged


def test_infeasible_budget_is_a_one_line_budget_error(lenet, data_dir):
    with pytest.raises(BudgetError, match="infeasible") as err:
        make_problem(**{**LENET, "budget": 0.001}, data_dir=data_dir)
    assert "\n" not in str(err.value)
    with pytest.raises(BudgetError, match="infeasible"):
        lenet.with_options(keep_first_last=8)  # first conv alone costs 1.76% at 8 bits


def test_unknown_sigma_names_the_shipped_sigmas(data_dir):
    from arq_gym.models import ZooError

    with pytest.raises(ZooError, match="shipped sigmas: 0.25, 0.5") as err:
        make_problem(**{**LENET, "sigma": 0.3}, data_dir=data_dir)
    assert "\n" not in str(err.value) and "checkpoint" in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"budget_mode": "greedy"}, "unknown budget_mode 'greedy'"),
        ({"bits": (1, 8)}, "bits range"),
        ({"keep_first_last": 9}, "keep_first_last"),
        ({"budget": -1.0}, "budget"),
        ({"device": "tpu"}, "unsupported device"),
    ],
)
def test_bad_problem_arguments(lenet, data_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_problem(**{**LENET, **kwargs}, data_dir=data_dir)


def test_make_problem_is_memoised(lenet, data_dir):
    assert make_problem(**LENET, data_dir=data_dir) is lenet
    if os.environ.get("ARQ_GYM_DATA") == str(data_dir):  # same folder, however it is named
        assert make_problem(**LENET) is lenet
    other = make_problem(**{**LENET, "budget": 0.03}, data_dir=data_dir)
    assert other is not lenet and other.budget == 0.03
    assert other.quantized is lenet.quantized and other._memo is lenet._memo


def test_evaluate_caches_in_memory(lenet):
    policy = Policy.from_bits([3, 4, 5, 4, 3])
    cert, info = lenet.evaluate(policy)
    again = lenet.evaluate(policy)
    assert again.info["cache_hit"] is True and again.certificate is cert
    assert again.policy == lenet.enforce(policy)
    assert set(info) == {"w_bits", "a_bits", "bops", "bops_fraction", "budget", "acr",
                         "certified_accuracy", "clean_accuracy", "abstain_rate", "fp_acr",
                         "eval_seconds", "cache_hit"}  # fmt: skip
    assert info["acr"] == cert.acr and info["clean_accuracy"] == cert.clean_accuracy
    assert info["certified_accuracy"]["0.25"] == cert.certified_accuracy(0.25)
    assert info["bops_fraction"] <= lenet.budget and info["fp_acr"] == lenet.fp_acr
    assert cert.meta["method"] == "irs" and len(cert) == 16
    assert cert.idx.tolist() == lenet.data_indices.tolist()  # noise addressed by split index


def test_evaluate_matches_certify_incremental(lenet):
    from arq_gym.smoothing import certify_incremental

    policy = Policy.uniform(5, 4, None)
    cert, _ = lenet.evaluate(policy)
    lenet.quantized.apply(policy)
    direct = certify_incremental(
        lenet.quantized,
        lenet.images,
        lenet.labels,
        lenet.irs_cache,
        n_p=100,
        alpha_zeta=0.001,
        gamma=0.99,
        progress=False,
    )
    for name in ("predict", "radius", "correct", "pa_lower"):
        np.testing.assert_array_equal(getattr(cert, name), getattr(direct, name))


def test_persistent_cache_is_shared_through_files(lenet, tmp_path):
    disk = lenet.with_options(cache_dir=tmp_path)
    assert (tmp_path / "irs" / lenet.irs_cache_name()).is_file()
    policy = Policy.from_bits([2, 4, 6, 3, 2])
    disk.clear_memory_cache()
    cert, info = disk.evaluate(policy)
    assert info["cache_hit"] is False
    files = list((tmp_path / "evals").rglob("*.json"))
    assert len(files) == 1 and files[0].name == "w2-4-6-3-2_a2-4-6-3-2.json"
    doc = json.loads(files[0].read_text())
    assert doc["format"] == "arq-eval/1" and doc["policy"]["w_bits"] == [2, 4, 6, 3, 2]
    assert not list(tmp_path.rglob("*.tmp"))
    disk.clear_memory_cache()  # as if another process: read back from the file
    cert2, info2 = disk.evaluate(policy)
    assert info2["cache_hit"] is True and cert2 is not cert
    np.testing.assert_array_equal(cert2.radius, cert.radius)
    np.testing.assert_array_equal(cert2.zeta, cert.zeta)
    assert info2["acr"] == info["acr"]
    files[0].write_text("{broken")  # a damaged entry is recomputed, not trusted
    disk.clear_memory_cache()
    cert3, info3 = disk.evaluate(policy)
    assert info3["cache_hit"] is False and info3["acr"] == info["acr"]


def test_backend_names_the_function_and_keys_the_evaluations(lenet, data_dir):
    from arq_gym.quant import check_int8_kernel

    ref = make_problem(**LENET, data_dir=data_dir, backend="reference")
    assert ref is not lenet and ref.function_id == "fake-quant-fp32"
    expected = "int8-exact-sums-compiled" if check_int8_kernel() else "fake-quant-fp32"
    assert lenet.function_id == expected  # the default backend is "auto"
    assert ref.describe()["function"] == "fake-quant-fp32"
    policy = Policy.uniform(5, 4, None)
    cert_ref, _ = ref.evaluate(policy)
    cert_fast, _ = lenet.evaluate(policy)
    assert cert_ref.meta["function"] == "fake-quant-fp32"
    assert cert_fast.meta["function"] == lenet.function_id
    if lenet.function_id != ref.function_id:  # different functions never share a cache entry
        assert ref.eval_key() != lenet.eval_key()
    # the same quantized network: the certificates agree on (nearly) every image
    assert (cert_ref.predict == cert_fast.predict).mean() >= 0.9
    with pytest.raises(ValueError, match="unknown backend 'int4'"):
        make_problem(**LENET, data_dir=data_dir, backend="int4")


def test_irs_cache_is_reused_not_rebuilt(lenet, data_dir):
    assert lenet.irs_cache_path.is_file()
    assert lenet.irs_cache.mismatches(lenet._irs_expected()) == []


def test_evaluation_is_deterministic_in_a_fresh_process(lenet, data_dir):
    policy = [3, 5, 4, 6, 2]
    _, info = lenet.evaluate(policy)
    code = (
        "import json, sys\n"
        "from arq_gym.problem import make_problem\n"
        f"p = make_problem(**{LENET!r}, data_dir={str(data_dir)!r})\n"
        f"print(json.dumps(p.evaluate({policy!r}).info))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600, check=True)  # fmt: skip
    fresh = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("w_bits", "a_bits", "bops", "acr", "certified_accuracy", "clean_accuracy",
                "abstain_rate", "fp_acr"):  # fmt: skip
        assert fresh[key] == info[key], key


def test_result_files_name_no_machine_folder(tmp_path, monkeypatch):
    from arq_gym.files import portable_path
    from arq_gym.problem import SHIPPED_CACHE_DIR

    monkeypatch.setenv("ARQ_GYM_CACHE", str(tmp_path / "cache"))
    assert portable_path(SHIPPED_CACHE_DIR / "abc_search.npz") == "arq_gym/models/caches/abc_search.npz"
    assert portable_path(tmp_path / "cache" / "irs" / "c.npz") == "<cache>/irs/c.npz"
    assert portable_path("results/x.tsv") == "results/x.tsv"
