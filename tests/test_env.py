"""The Gymnasium environments: registration, spaces, kwargs, determinism, checkers, errors."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import arq_gym
from arq_gym.envs import ENV_SPECS, register_envs
from arq_gym.envs.arq_env import OBSERVATION_FEATURES, ARQEnv, bits_from_action
from arq_gym.policy import Policy

# these tests drive one bit-width per layer (bits_mode="tied", the v0 action space); the
# separate weight/activation bits of the default mode are tested in test_bits_mode.py
SMOKE = {"fidelity": "smoke", "device": "cpu", "bits_mode": "tied"}
CONTRACT_INFO_KEYS = {
    "w_bits", "a_bits", "requested_bits", "bops", "bops_fraction", "budget", "acr",
    "certified_accuracy", "clean_accuracy", "abstain_rate", "fp_acr", "reward_name",
    "eval_seconds", "cache_hit",
}  # fmt: skip


@pytest.fixture(scope="module")
def resnet_kw(data_dir) -> dict:
    return {**SMOKE, "data_dir": str(data_dir)}  # the shipped ResNet-20, sigma 0.25


@pytest.fixture(scope="module")
def lenet_kw(data_dir) -> dict:
    return {**SMOKE, "data_dir": str(data_dir)}


def run_episode(env, bits_or_actions, seed=None):
    """Step ``env`` through one episode with the given actions; return (rewards, infos, obs)."""
    obs, _ = env.reset(seed=seed)
    rewards, infos, observations = [], [], [obs]
    for a in bits_or_actions:
        obs, r, terminated, truncated, info = env.step(a)
        rewards.append(r)
        infos.append(info)
        observations.append(obs)
        assert truncated is False
        if terminated:
            break
    return rewards, infos, observations


def action_for_bits(bits: int, lo: int = 2, hi: int = 8) -> np.ndarray:
    """The continuous action at the centre of the bin of ``bits``."""
    u = (bits - lo + 0.5) / (hi - lo + 1)
    return np.array([2 * u - 1], dtype=np.float32)


# ---------------------------------------------------------------------- registration


def test_registration_is_idempotent():
    before = {k: gym.spec(k) for k in ENV_SPECS}
    register_envs()
    import importlib

    importlib.reload(arq_gym)
    for env_id, kwargs in ENV_SPECS.items():
        spec = gym.spec(env_id)
        assert spec.entry_point == "arq_gym.envs.arq_env:ARQEnv"
        assert spec.kwargs == kwargs and spec is before[env_id]
    assert ENV_SPECS["ARQ-ResNet20-v0"]["budget"] == 1 / 64
    assert ENV_SPECS["ARQ-ResNet20-v0"]["reward"] == "acr"
    assert ENV_SPECS["ARQ-ResNet20-v0"]["fidelity"] == "search"


def test_envs_command_lists_every_registered_id(capsys):
    import json

    from arq_gym.cli import main

    assert main(["envs", "--json"]) == 0
    envs = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["envs"]
    assert [e["id"] for e in envs] == list(ENV_SPECS)
    cifar = next(e for e in envs if e["id"] == "ARQ-MobileNetV2-CIFAR-v0")
    assert cifar["kwargs"]["model"] == "mobilenet_v2_cifar" and cifar["kwargs"]["sigma"] == 0.25


def test_module_prefixed_id_in_a_fresh_interpreter():
    # the error comes from ARQEnv's own argument check, so the id resolved to the class
    code = (
        "import gymnasium as gym, sys\n"
        "assert 'arq_gym' not in sys.modules\n"
        "try:\n"
        "    gym.make('arq_gym:ARQ-ResNet20-v0', reward='nope')\n"
        "except ValueError as e:\n"
        "    print('ERR', e)\n"
        "print(gym.spec('ARQ-ResNet20-v0').kwargs['model'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=True).stdout  # fmt: skip
    assert "ERR unknown reward 'nope'; choose one of acr, certified_accuracy" in out
    assert out.strip().endswith("resnet20")


# ---------------------------------------------------------------------- action mapping


def test_haq_action_mapping_uses_equal_bins():
    assert bits_from_action(-1.0, (2, 8)) == 2 and bits_from_action(1.0, (2, 8)) == 8
    assert bits_from_action(-5.0, (2, 8)) == 2 and bits_from_action(7.0, (2, 8)) == 8
    assert [bits_from_action(float(action_for_bits(b)[0]), (2, 8)) for b in range(2, 9)] == list(
        range(2, 9)
    )
    grid = np.linspace(-1, 1, 7001)
    counts = np.bincount([bits_from_action(a, (2, 8)) for a in grid])[2:]
    assert counts.min() >= 999 and counts.max() <= 1001  # 7 equal bins
    assert bits_from_action(0.3, (4, 4)) == 4


def test_discretize_action_bins_hit_every_bit_width():
    wrapper_centres = np.linspace(-1, 1, 8)[:-1] + 1 / 7
    assert [bits_from_action(c, (2, 8)) for c in wrapper_centres] == list(range(2, 9))


# ---------------------------------------------------------------------- spaces and episodes


def test_lenet_spaces_and_episode(lenet_kw):
    env = gym.make("ARQ-LeNet5-v0", **lenet_kw)
    u = env.unwrapped
    assert isinstance(u, ARQEnv) and u.num_layers == 5
    assert env.action_space == gym.spaces.Box(-1, 1, (1,), np.float32)
    assert env.observation_space.shape == (len(OBSERVATION_FEATURES),) == (13,)
    assert env.observation_space.dtype == np.float32
    rewards, infos, observations = run_episode(env, [action_for_bits(4)] * 5)
    assert rewards[:4] == [0.0] * 4 and type(rewards[-1]) is float
    assert all(env.observation_space.contains(o) for o in observations)
    assert infos[0] == {"layer": "conv1", "bits": 4, "requested_bits": 4}
    info = infos[-1]
    assert set(info) == CONTRACT_INFO_KEYS
    assert info["w_bits"] == info["a_bits"] == [4] * 5  # W4A4 fits 1/64 exactly
    assert info["requested_bits"] == [4] * 5 and info["reward_name"] == "acr"
    assert rewards[-1] == info["acr"] == u.last_certificate.acr
    assert info["bops_fraction"] == pytest.approx(1 / 64) and info["budget"] == 1 / 64
    assert isinstance(info["cache_hit"], bool) and info["eval_seconds"] >= 0
    assert set(info["certified_accuracy"]) >= {"0.0", "0.25", "0.5", "1.0"}


def test_observation_features(lenet_kw):
    env = gym.make("ARQ-LeNet5-v0", **lenet_kw).unwrapped
    p = env.problem
    _, _, obs = run_episode(env, [action_for_bits(b) for b in (8, 2, 5, 3, 6)])
    obs = np.stack(obs)
    names = list(OBSERVATION_FEATURES)
    col = {n: obs[:, names.index(n)] for n in names}
    np.testing.assert_allclose(col["layer_index"][:5], [0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(col["mac_share"][:5], np.array(p.macs) / sum(p.macs), rtol=1e-6)
    assert col["kernel"][0] == 1.0 and col["kernel"][2] == 0.0  # conv 5x5 vs linear
    assert col["feature_map"][0] == 1.0 and col["depthwise"].max() == 0.0
    assert col["c_in"].min() == 0.0 and col["c_in"].max() == 1.0
    for name in ("previous_w_bits", "previous_a_bits"):  # tied: both the same
        np.testing.assert_allclose(col[name], [1, 1, 0, 0.5, 1 / 6, 4 / 6], rtol=1e-6)
    budget = float(p.budget_bops)
    spent = np.cumsum([0] + [m * b * b for m, b in zip(p.macs, (8, 2, 5, 3, 6))])
    np.testing.assert_allclose(col["budget_spent"], np.minimum(spent / budget, 1), rtol=1e-5)
    needed0 = p.min_bops_from(0) / budget
    assert col["budget_needed"][0] == pytest.approx(needed0, rel=1e-6) and needed0 == 0.25
    assert col["budget_needed"][-1] == 0.0
    assert obs.min() >= 0 and obs.max() <= 1


def test_resnet20_has_20_steps_and_pins_first_and_last(resnet_kw):
    env = gym.make("ARQ-ResNet20-v0", **resnet_kw)
    assert env.unwrapped.num_layers == 20
    rewards, infos, _ = run_episode(env, [action_for_bits(2)] * 20)
    assert len(rewards) == 20
    info = infos[-1]
    assert info["requested_bits"] == [2] * 20
    assert info["w_bits"][0] == info["a_bits"][0] == 8 == info["w_bits"][-1]
    assert info["w_bits"][1:-1] == [2] * 18
    assert infos[0]["bits"] == 8 and infos[1]["bits"] == 2


# ---------------------------------------------------------------------- checkers


@pytest.mark.parametrize("env_id", ["ARQ-ResNet20-v0", "ARQ-LeNet5-v0"])
def test_gymnasium_and_sb3_check_env_pass_without_warnings(env_id, resnet_kw, lenet_kw):
    from gymnasium.utils.env_checker import check_env as gym_check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    kw = resnet_kw if "ResNet" in env_id else lenet_kw
    for render_mode in (None, "ansi"):
        env = gym.make(env_id, render_mode=render_mode, **kw)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gym_check_env(env.unwrapped)
            sb3_check_env(env)
        assert [str(w.message) for w in caught] == []
    for action_type in ("discrete",):
        env = gym.make(env_id, action_type=action_type, **kw)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gym_check_env(env.unwrapped)
            sb3_check_env(env)
        assert [str(w.message) for w in caught] == []


# ---------------------------------------------------------------------- determinism


def test_same_policy_same_reward_across_instances_and_resets(lenet_kw):
    actions = [action_for_bits(b) for b in (6, 3, 5, 7, 2)]
    env_a = gym.make("ARQ-LeNet5-v0", **lenet_kw)
    env_b = gym.make("ARQ-LeNet5-v0", **lenet_kw)
    r1, i1, o1 = run_episode(env_a, actions, seed=1)
    env_a.unwrapped.problem.clear_memory_cache()  # force a second certification
    r2, i2, o2 = run_episode(env_b, actions, seed=2)
    r3, i3, o3 = run_episode(env_a, actions, seed=1)
    assert i2[-1]["cache_hit"] is False and i3[-1]["cache_hit"] is True
    for info in (i2[-1], i3[-1]):
        for key in CONTRACT_INFO_KEYS - {"eval_seconds", "cache_hit"}:
            assert info[key] == i1[-1][key], key
    assert r1 == r2 == r3
    for a, b in zip(o1, o2):
        np.testing.assert_array_equal(a, b)
    obs_1, _ = env_a.reset(seed=5)
    obs_2, _ = env_a.reset(seed=5)
    np.testing.assert_array_equal(obs_1, obs_2)


# ---------------------------------------------------------------------- certificate equality


@pytest.mark.filterwarnings("ignore::arq_gym.budget.BudgetWarning")  # 1/16 admits all: wanted
@pytest.mark.parametrize("bits", [4, 8])
def test_uniform_policy_through_env_equals_certify_incremental(bits, resnet_kw):
    from arq_gym.smoothing import certify_incremental

    # budget 1/16 admits W8A8; with nothing pinned the enforced policy is the uniform one
    env = gym.make("ARQ-ResNet20-v0", budget=1 / 16, keep_first_last=None, **resnet_kw)
    rewards, infos, _ = run_episode(env, [action_for_bits(bits)] * 20)
    info = infos[-1]
    assert info["w_bits"] == info["a_bits"] == [bits] * 20
    p = env.unwrapped.problem
    p.quantized.apply(Policy.uniform(20, bits, None))
    direct = certify_incremental(p.quantized, p.images, p.labels, p.irs_cache, n_p=100,
                                 alpha_zeta=0.001, gamma=0.99, progress=False)  # fmt: skip
    cert = env.unwrapped.last_certificate
    for name in ("idx", "label", "predict", "radius", "correct"):
        np.testing.assert_array_equal(getattr(cert, name), getattr(direct, name))
    assert rewards[-1] == direct.acr == info["acr"]
    assert info["clean_accuracy"] == direct.clean_accuracy
    assert info["certified_accuracy"]["0.25"] == direct.certified_accuracy(0.25)


# ---------------------------------------------------------------------- keyword arguments


@pytest.mark.parametrize(
    ("reward", "expected"),
    [
        ("acr", lambda c, fp: c.acr),
        ("certified_accuracy", lambda c, fp: c.certified_accuracy(0.1)),
        ("clean_accuracy", lambda c, fp: c.clean_accuracy),
        ("acr_delta", lambda c, fp: c.acr - fp),
    ],
)
def test_reward_names(reward, expected, lenet_kw):
    env = gym.make("ARQ-LeNet5-v0", reward=reward, reward_radius=0.1, **lenet_kw)
    rewards, infos, _ = run_episode(env, [action_for_bits(5)] * 5)
    cert = env.unwrapped.last_certificate
    assert rewards[-1] == pytest.approx(expected(cert, infos[-1]["fp_acr"]), abs=1e-12)
    assert infos[-1]["reward_name"] == reward
    assert "0.1" in infos[-1]["certified_accuracy"]


def test_budget_bits_keep_first_last_and_clip_mode(lenet_kw):
    # budget 0.035 lies between the cheapest (0.024) and the largest (0.043) allowed policy
    env = gym.make("ARQ-LeNet5-v0", budget=0.035, bits=(3, 6), keep_first_last=8,
                   budget_mode="clip", **lenet_kw)  # fmt: skip
    assert env.action_space == gym.spaces.Box(-1, 1, (1,), np.float32)
    _, infos, obs = run_episode(env, [np.array([1.0], np.float32)] * 5)
    info = infos[-1]
    assert info["budget"] == 0.035 and info["bops_fraction"] <= 0.035
    assert info["requested_bits"] == [6] * 5
    assert info["w_bits"][0] == 8 == info["w_bits"][-1]
    assert all(3 <= b <= 6 for b in info["w_bits"][1:-1])
    assert info["w_bits"][1:-1] != [6, 6, 6]  # the budget binds: some request was clipped
    # clip mode: the bits chosen during the episode are the enforced ones
    assert [i["bits"] for i in infos[:-1]] == info["w_bits"][:-1]
    assert info["w_bits"] == info["a_bits"]


def test_haq_mode_lowers_bits_after_the_episode(lenet_kw):
    env = gym.make("ARQ-LeNet5-v0", budget_mode="haq", **lenet_kw)
    _, infos, _ = run_episode(env, [np.array([1.0], np.float32)] * 5)
    assert [i["bits"] for i in infos[:-1]] == [8] * 4  # steps keep the request
    assert infos[-1]["bops_fraction"] <= 1 / 64 and max(infos[-1]["w_bits"]) < 8


def test_discrete_actions(lenet_kw):
    env = gym.make("ARQ-LeNet5-v0", action_type="discrete", bits=(2, 6), **lenet_kw)
    assert env.action_space == gym.spaces.Discrete(5)
    _, infos, _ = run_episode(env, [0, np.int64(1), 2, np.array(3), np.array([4])])
    assert infos[-1]["requested_bits"] == [2, 3, 4, 5, 6]
    # continuous actions out of [-1, 1] stay clipped (exploration noise leaves the box)
    cont = gym.make("ARQ-LeNet5-v0", bits=(2, 6), **lenet_kw)
    _, infos, _ = run_episode(cont, [np.array([9.0], np.float32), np.array([-3.0], np.float32)]
                              + [np.zeros(1, np.float32)] * 3)  # fmt: skip
    assert infos[-1]["requested_bits"][:2] == [6, 2]


def test_fidelity_overrides_and_cache_dir(lenet_kw, tmp_path):
    env = gym.make("ARQ-LeNet5-v0", images=8, n=400, n_p=50, alpha=0.01, cache_dir=tmp_path,
                   **lenet_kw)  # fmt: skip
    p = env.unwrapped.problem
    assert (p.fidelity.images, p.fidelity.n, p.fidelity.n_p, p.fidelity.alpha) == (8, 400, 50, 0.01)
    assert len(p.images) == 8 and p.irs_cache.meta["n"] == 400
    assert p.irs_cache_path == tmp_path / "irs" / p.irs_cache_name()
    _, infos, _ = run_episode(env, [action_for_bits(3)] * 5)
    cert = env.unwrapped.last_certificate
    assert len(cert) == 8 and cert.meta["n_p"] == 50
    assert len(list((tmp_path / "evals").rglob("*.json"))) == 1


@pytest.mark.parametrize("env_id", ["ARQ-LeNet5-v0", "ARQ-ResNet20-v0",
                                    "ARQ-MobileNetV2-CIFAR-v0"])  # fmt: skip
def test_default_search_fidelity_uses_a_shipped_cache(env_id, lenet_kw):
    """Creating the default env (fidelity "search") certifies nothing: the IRS cache ships."""
    from arq_gym.models import shipped_models
    from arq_gym.problem import SHIPPED_CACHE_DIR

    arch = ENV_SPECS[env_id]["model"]
    if not any(m["architecture"] == arch and m["sigma"] == 0.25 for m in shipped_models()):
        pytest.skip(f"no shipped {arch} model yet")
    kw = {k: v for k, v in lenet_kw.items() if k != "fidelity"}
    env = gym.make(env_id, **kw)
    p = env.unwrapped.problem
    assert p.fidelity.name == "search" and len(p.images) == 100
    assert p.irs_cache_path.parent == SHIPPED_CACHE_DIR, "ship the IRS cache (ship_irs_cache)"
    assert p.irs_cache.built is False
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)


def test_sigma_and_checkpoint(lenet_kw, tmp_path):
    import shutil

    from arq_gym.models.zoo import WEIGHTS_DIR

    env = gym.make("ARQ-LeNet5-v0", sigma=0.5, **lenet_kw)
    assert env.unwrapped.problem.sigma == 0.5
    assert env.unwrapped.problem.irs_cache.sigma == 0.5
    ckpt = tmp_path / "mine.pt"
    shutil.copyfile(WEIGHTS_DIR / "lenet5_fashion_mnist_s0.5.pt", ckpt)
    mine = gym.make("ARQ-LeNet5-v0", checkpoint=str(ckpt), **lenet_kw)
    # sigma comes from the checkpoint; same weights, same certificate
    assert mine.unwrapped.problem.sigma == 0.5
    actions = [action_for_bits(5)] * 5
    r_shipped, _, _ = run_episode(env, actions)
    r_mine, _, _ = run_episode(mine, actions)
    assert r_shipped == r_mine


def test_device_and_data_dir(lenet_kw):
    kw = {k: v for k, v in lenet_kw.items() if k != "device"}
    auto = gym.make("ARQ-LeNet5-v0", device="auto", **kw)
    cpu = gym.make("ARQ-LeNet5-v0", device="cpu", **kw)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert auto.unwrapped.problem.device.type == expected
    assert cpu.unwrapped.problem.device.type == "cpu"
    if not torch.cuda.is_available():
        assert auto.unwrapped.problem is cpu.unwrapped.problem
        with pytest.raises(ValueError, match="CUDA is not available"):
            gym.make("ARQ-LeNet5-v0", device="cuda", **kw)
    assert Path(lenet_kw["data_dir"]).is_dir()
    with pytest.raises(Exception, match="does not exist"):
        gym.make("ARQ-LeNet5-v0", **{**lenet_kw, "data_dir": "/nonexistent/arq-data"})


def test_render_ansi_table(lenet_kw):
    env = gym.make("ARQ-LeNet5-v0", render_mode="ansi", **lenet_kw)
    env.reset()
    env.step(action_for_bits(6))
    env.step(action_for_bits(3))
    text = env.render()
    lines = text.splitlines()
    assert lines[0].split() == ["#", "layer", "kind", "MACs", "req", "W", "A", "BOPs"]
    assert lines[1].split()[:2] == ["0", "conv1"] and lines[2].split()[1] == "conv2"
    assert "step 2/5" in lines[-1] and len(lines) == 4
    shares = [float(line.split()[-1].rstrip("%")) for line in lines[1:3]]
    assert math.isclose(sum(shares), 100.0, abs_tol=0.2)
    for _ in range(3):
        env.step(action_for_bits(4))
    final = env.render()
    assert "(enforced)" in final and "ACR" in final and len(final.splitlines()) == 8
    assert gym.make("ARQ-LeNet5-v0", **lenet_kw).unwrapped.render() is None


def test_render_rgb_array_image(resnet_kw):
    env = gym.make("ARQ-ResNet20-v0", render_mode="rgb_array", **resnet_kw)
    assert "rgb_array" in env.metadata["render_modes"] and "ansi" in env.metadata["render_modes"]
    env.reset(seed=0)
    start = env.render()
    assert isinstance(start, np.ndarray) and start.dtype == np.uint8
    assert start.shape == (400, 640, 3)
    assert start.min() < 100 and start.max() == 255  # something is drawn on white

    def image_after(actions):
        env.reset(seed=0)
        for a in actions:
            env.step(a)
        return env.render()

    low = image_after([action_for_bits(2)] * 5)
    high = image_after([action_for_bits(8)] * 5)
    assert low.shape == high.shape == start.shape
    assert not np.array_equal(low, start) and not np.array_equal(low, high)

    def coloured(img):  # coloured (not grey) pixels of the bits panel's left half
        r, g, b = (img[30:240, 60:330].astype(int)[..., c] for c in range(3))
        return int(((abs(r - g) > 60) | (abs(g - b) > 60)).sum())

    # layers 1-4 at 8 bits fill more of the panel with bars than at 2 bits
    assert coloured(high) > coloured(low) > coloured(start)
    assert np.array_equal(image_after([action_for_bits(8)] * 5), high)  # deterministic
    final = image_after([action_for_bits(4)] * 20)  # the enforced policy and its certificate
    assert final.shape == start.shape and not np.array_equal(final, high)
    # gym.make builds "rgb_array_list" on top of it
    frames = gym.make("ARQ-ResNet20-v0", render_mode="rgb_array_list", **resnet_kw)
    frames.reset(seed=0)
    frames.step(action_for_bits(4))
    listed = frames.render()
    assert isinstance(listed, list) and len(listed) == 2 and listed[0].shape == (400, 640, 3)


def test_unsupported_render_mode_warns_and_renders_nothing(lenet_kw):
    with pytest.warns(UserWarning, match="render_mode='vr'.*render\\(\\) will return None"):
        env = ARQEnv(**{**ENV_SPECS["ARQ-LeNet5-v0"], **lenet_kw}, render_mode="vr")
    env.reset()
    env.step(np.zeros(1, np.float32))
    assert env.render() is None


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("action", "match"),
    [
        (np.array([np.nan], np.float32), "action must be finite, got nan"),
        (np.array([np.inf], np.float32), "action must be finite, got inf"),
        (np.array([-np.inf], np.float32), "action must be finite, got -inf"),
        (np.zeros(2, np.float32), r"action must have shape \(1,\), got shape \(2,\)"),
        (np.zeros((1, 1), np.float32), r"got shape \(1, 1\)"),
        ("four", "action must be a number"),
    ],
)
def test_bad_continuous_actions(action, match, lenet_kw):
    env = ARQEnv(**{**ENV_SPECS["ARQ-LeNet5-v0"], **lenet_kw})
    env.reset()
    with pytest.raises(ValueError, match=match) as err:
        env.step(action)
    assert "\n" not in str(err.value)
    env.step(np.array([0.0], np.float32))  # the env is still usable


def test_bad_discrete_actions(lenet_kw):
    env = ARQEnv(**{**ENV_SPECS["ARQ-LeNet5-v0"], **lenet_kw}, action_type="discrete")
    env.reset()
    with pytest.raises(ValueError, match="discrete action must be an integer, got 2.5"):
        env.step(2.5)
    with pytest.raises(ValueError, match="action must be finite"):
        env.step(float("nan"))
    with pytest.raises(ValueError, match="shape"):
        env.step([1, 2])
    env.step(0)  # the env is still usable


@pytest.mark.parametrize("action", [99, -1, 7, np.int64(-3), np.array(12), np.array([7]), 7.0])
def test_discrete_actions_outside_the_space_are_errors(action, lenet_kw):
    env = ARQEnv(**{**ENV_SPECS["ARQ-LeNet5-v0"], **lenet_kw}, action_type="discrete")
    assert env.action_space == gym.spaces.Discrete(7)  # bits 2 .. 8
    assert not env.action_space.contains(np.int64(np.asarray(action).reshape(-1)[0]))
    env.reset()
    with pytest.raises(ValueError, match=r"discrete action -?\d+ is outside the action space "
                       r"Discrete\(7\) \(0 \.\. 6 = 2 \.\. 8 bits\)") as err:  # fmt: skip
        env.step(action)
    assert "\n" not in str(err.value)
    _, _, _, _, info = env.step(6)  # the env is still usable; the edges are in the space
    assert info["requested_bits"] == 8
    assert env.step(np.int64(0))[4]["requested_bits"] == 2


def test_budget_above_one_or_constraining_nothing(lenet_kw):
    """Above 1 is refused in one line; at or above the largest allowed policy's cost it warns,
    once per budget setting (LeNet-5, bits (2, 8), nothing pinned: the largest costs 1/16)."""
    from arq_gym.budget import BudgetError, BudgetWarning

    for budget in (2, 1.5):
        with pytest.raises(BudgetError, match=f"budget {budget:g} is above 1") as err:
            gym.make("ARQ-LeNet5-v0", budget=budget, **lenet_kw)
        assert "\n" not in str(err.value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        env = gym.make("ARQ-LeNet5-v0", budget=0.75, **lenet_kw)
        again = gym.make("ARQ-LeNet5-v0", budget=0.75, **lenet_kw)  # same problem: no repeat
        constrained = gym.make("ARQ-LeNet5-v0", budget=1 / 17, **lenet_kw)  # below 1/16
    budget_warnings = [w for w in caught if issubclass(w.category, BudgetWarning)]
    assert [str(w.message) for w in budget_warnings] == [
        "budget 0.75 of FP32 BOPs constrains nothing: the largest allowed policy (every layer "
        "at 8 bits) costs 0.0625; pass a smaller budget (e.g. 1/64, uniform W4A4) for a "
        "constrained search"
    ]
    assert again.unwrapped.problem is env.unwrapped.problem
    # at the largest policy's cost it still warns: W8A8 everywhere fits exactly
    with pytest.warns(BudgetWarning, match="budget 0.0625 of FP32 BOPs constrains nothing"):
        env.unwrapped.problem.with_options(budget=1 / 16)
    _, infos, _ = run_episode(constrained, [np.ones(1, np.float32)] * 5)
    assert infos[-1]["w_bits"] != [8] * 5  # 1/17 constrains: the all-8 request is lowered


def test_step_before_reset_and_after_the_end(lenet_kw):
    env = ARQEnv(**{**ENV_SPECS["ARQ-LeNet5-v0"], **lenet_kw})
    with pytest.raises(RuntimeError, match="call reset\\(\\) before step\\(\\)"):
        env.step(np.zeros(1, np.float32))
    wrapped = gym.make("ARQ-LeNet5-v0", **lenet_kw)
    with pytest.raises(gym.error.ResetNeeded, match="before calling"):
        wrapped.step(np.zeros(1, np.float32))
    run_episode(env, [np.zeros(1, np.float32)] * 5)
    with pytest.raises(RuntimeError, match="the episode has ended; call reset\\(\\)"):
        env.step(np.zeros(1, np.float32))


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"reward": "loss"}, ValueError, "unknown reward 'loss'; choose one of acr, "),
        ({"action_type": "binary"}, ValueError, "unknown action_type 'binary'"),
        ({"reward_radius": -1}, ValueError, "reward_radius must be"),
        ({"budget": 0.001}, ValueError, "infeasible"),
        ({"budget": 2}, ValueError, "budget 2 is above 1: it is a fraction of the FP32"),
        ({"budget": 1.0000001}, ValueError, "must be in \\(0, 1\\]"),
        ({"sigma": 0.3}, ValueError, "no shipped lenet5 for sigma 0.3; shipped sigmas: 0.25, 0.5"),
        ({"fidelity": "smoke", "n_p": 5000}, ValueError, "must not exceed n"),
        ({"checkpoint": "/nonexistent/model.pt"}, Exception, "does not exist"),
    ],
)
def test_bad_kwargs_are_one_line_errors(kwargs, exc, match, lenet_kw):
    from arq_gym.budget import BudgetError

    with pytest.raises(exc, match=match) as err:
        gym.make("ARQ-LeNet5-v0", **{**lenet_kw, **kwargs})
    assert "\n" not in str(err.value)
    if "budget" in kwargs:
        assert isinstance(err.value, BudgetError)


@pytest.mark.filterwarnings("ignore::arq_gym.budget.BudgetWarning")  # 0.07 admits all: wanted
@pytest.mark.parametrize("bits", [4, 8])
def test_uniform_policy_through_env_equals_the_certify_command(bits, lenet_kw, capsys):
    """`arq-gym certify --uniform B --incremental` on the smoke subset gives the env's numbers."""
    import json

    from arq_gym.cli import main

    env = gym.make("ARQ-LeNet5-v0", budget=0.07, keep_first_last=8, **lenet_kw)
    _, infos, _ = run_episode(env, [action_for_bits(bits)] * 5)
    info = infos[-1]
    assert info["w_bits"] == info["a_bits"] == [8] + [bits] * 3 + [8]
    argv = ["certify", "--model", "lenet5", "--dataset", "fashion_mnist", "--sigma", "0.25",
            "--uniform", str(bits), "--split", "val", "--images", "16", "--n0", "100",
            "--n", "1000", "--incremental", "--n-p", "100", "--n-p-max", "100",
            "--data-dir", lenet_kw["data_dir"], "--device", "cpu", "--quiet", "--json"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["bops_fraction"] == pytest.approx(info["bops_fraction"])
    for key in ("acr", "clean_accuracy", "abstain_rate", "fp_acr"):
        assert out[key] == pytest.approx(info[key], abs=1e-12), key
    for radius, value in out["certified_accuracy"].items():
        assert info["certified_accuracy"][radius] == value
