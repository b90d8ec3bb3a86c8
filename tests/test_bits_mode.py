"""Separate weight and activation bits per step (bits_mode="wa", the default) against "tied"."""

from __future__ import annotations

import csv
import json
import warnings

import gymnasium as gym
import numpy as np
import pytest

from arq_gym.budget import clip_bits, enforce_budget
from arq_gym.envs.arq_env import OBSERVATION_FEATURES, bits_from_action, pair_from_discrete
from arq_gym.policy import Policy


@pytest.fixture(scope="module")
def kw(data_dir) -> dict:
    return {"fidelity": "smoke", "device": "cpu", "data_dir": str(data_dir)}


def action(w: int, a: int, lo: int = 2, hi: int = 8) -> np.ndarray:
    """The continuous action at the centre of the bins of ``w`` and ``a`` bits."""
    centre = [2 * (b - lo + 0.5) / (hi - lo + 1) - 1 for b in (w, a)]
    assert [bits_from_action(c, (lo, hi)) for c in centre] == [w, a]
    return np.array(centre, dtype=np.float32)


def episode(env, actions):
    env.reset(seed=0)
    for a in actions:
        obs, reward, terminated, _, info = env.step(a)
    assert terminated
    return obs, reward, info


def test_wa_is_the_default_with_two_dim_box_and_pair_discrete(kw):
    env = gym.make("ARQ-LeNet5-v0", **kw)
    assert env.unwrapped.bits_mode == "wa"
    assert env.action_space == gym.spaces.Box(-1, 1, (2,), np.float32)
    disc = gym.make("ARQ-LeNet5-v0", action_type="discrete", **kw)
    assert disc.action_space == gym.spaces.Discrete(49)
    pairs = [pair_from_discrete(k, (2, 8)) for k in range(49)]
    assert len(set(pairs)) == 49 and pairs[0] == (2, 2) and pairs[-1] == (8, 8)
    assert pair_from_discrete(7 * (5 - 2) + (3 - 2), (2, 8)) == (5, 3)
    tied = gym.make("ARQ-LeNet5-v0", bits_mode="tied", action_type="discrete", **kw)
    assert tied.action_space == gym.spaces.Discrete(7)
    with pytest.raises(ValueError, match="unknown bits_mode 'both'"):
        gym.make("ARQ-LeNet5-v0", bits_mode="both", **kw)


def test_continuous_and_discrete_actions_decode_to_pairs(kw):
    env = gym.make("ARQ-LeNet5-v0", budget=1 / 16, **kw)  # 1/16 leaves W/A up to 8/5 intact
    requested = [(8, 4), (4, 2), (6, 3), (3, 7), (2, 8)]
    env.reset(seed=0)
    _, _, _, _, info0 = env.step(action(*requested[0]))
    assert info0["requested_bits"] == [8, 4] and info0["bits"] == [8, 4]
    _, _, info = episode(env, [action(w, a) for w, a in requested])
    assert info["requested_bits"] == [list(p) for p in requested]
    assert info["w_bits"] == [w for w, _ in requested]
    assert info["a_bits"] == [a for _, a in requested]
    disc = gym.make("ARQ-LeNet5-v0", budget=1 / 16, action_type="discrete", **kw)
    _, reward_d, info_d = episode(disc, [7 * (w - 2) + (a - 2) for w, a in requested])
    assert info_d["w_bits"] == info["w_bits"] and info_d["a_bits"] == info["a_bits"]
    with pytest.raises(ValueError, match=r"outside the action space Discrete\(49\)"):
        disc.reset(seed=0)
        disc.step(49)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        env.reset(seed=0)
        env.step(np.zeros(1, dtype=np.float32))


def test_observation_has_previous_weight_and_activation_bits(kw):
    env = gym.make("ARQ-LeNet5-v0", budget=1 / 16, **kw).unwrapped
    names = list(OBSERVATION_FEATURES)
    iw, ia = names.index("previous_w_bits"), names.index("previous_a_bits")
    obs, _ = env.reset(seed=0)
    assert obs.shape == (13,) and obs[iw] == obs[ia] == 1.0
    obs, *_ = env.step(action(8, 2))
    assert obs[iw] == pytest.approx(1.0) and obs[ia] == pytest.approx(0.0)
    obs, *_ = env.step(action(5, 6))
    assert obs[iw] == pytest.approx(0.5) and obs[ia] == pytest.approx(4 / 6)


def test_haq_enforcement_of_separate_bits_fits_the_budget(kw):
    env = gym.make("ARQ-LeNet5-v0", **kw)  # 1/64, every layer searched
    _, _, info = episode(env, [action(8, 6)] * 5)
    assert info["bops_fraction"] <= 1 / 64
    p = env.unwrapped.problem
    expected = enforce_budget(Policy((8,) * 5, (6,) * 5), p.layers, 1 / 64, "haq", (2, 8), None)
    assert info["w_bits"] == list(expected.w_bits) and info["a_bits"] == list(expected.a_bits)
    # HAQ lowers activation bits before weight bits, from the last layer
    assert info["a_bits"][-1] < 6 and info["a_bits"][-1] <= info["w_bits"][-1]


def test_clip_mode_lowers_the_larger_of_the_pair_first(kw):
    env = gym.make("ARQ-LeNet5-v0", budget_mode="clip", **kw)
    _, _, info = episode(env, [action(8, 5)] * 5)
    assert info["bops_fraction"] <= 1 / 64
    p = env.unwrapped.problem
    spent, lowered = 0, 0
    for i, (w, a) in enumerate(zip(info["w_bits"], info["a_bits"])):
        assert (w, a) == clip_bits(i, (8, 5), spent, p.layers, 1 / 64, (2, 8), None)
        if (w, a) != (8, 5):  # lowered from the larger side towards the other
            lowered += 1
            assert abs(w - a) <= 1 and w >= a
        spent += p.macs[i] * w * a
    assert lowered >= 1
    assert isinstance(clip_bits(1, 6, 0, p.layers, 1 / 64, (2, 8), None), int)  # tied: an int


@pytest.mark.parametrize("action_type", ["continuous", "discrete"])
def test_both_checkers_pass_without_warnings_in_wa_mode(action_type, kw):
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = gym.make("ARQ-LeNet5-v0", action_type=action_type, render_mode="ansi", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env.unwrapped)
        sb3_check_env(env.unwrapped, warn=True)
    env.reset(seed=0)
    env.step(env.action_space.sample())
    assert "/" in env.render().splitlines()[1]  # the requested column shows "w/a"


@pytest.mark.parametrize("agent", ["arq-ddpg", "random", "sb3-td3", "sb3-ppo", "sb3-dqn"])
def test_agents_search_in_wa_mode(agent, kw, tmp_path, one_torch_thread):
    from arq_gym.experiments.search import search

    env_kwargs = dict(kw)
    agent_kwargs = {"warmup_episodes": 1} if agent == "arq-ddpg" else {}
    if agent == "sb3-dqn":
        env_kwargs["action_type"] = "discrete"
    if agent in ("sb3-td3", "sb3-dqn"):
        agent_kwargs = {"learning_starts": 5}
    res = search("ARQ-LeNet5-v0", agent, 3, 0, tmp_path / agent, env_kwargs=env_kwargs,
                 agent_kwargs=agent_kwargs, final_eval=False, progress=False,
                 tensorboard=False)  # fmt: skip
    assert res["episodes"] == 3
    with open(tmp_path / agent / "episodes.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    pairs = rows[-1]["requested_bits"].split()
    assert len(pairs) == 5 and all(len(p.split("/")) == 2 for p in pairs)
    policy = json.loads((tmp_path / agent / "best_policy.json").read_text())
    assert policy["bops_fraction"] <= 1 / 64
    run = json.loads((tmp_path / agent / "run.json").read_text())
    assert run["action_space"] == str(gym.make("ARQ-LeNet5-v0", **env_kwargs).action_space)


def test_resuming_a_run_from_before_bits_mode_is_refused_with_one_line(kw, tmp_path):
    from arq_gym.experiments.search import SearchError, search

    out = tmp_path / "old"
    search("ARQ-LeNet5-v0", "random", 1, 0, out, env_kwargs=kw, final_eval=False,
           progress=False, tensorboard=False)  # fmt: skip
    run = json.loads((out / "run.json").read_text())
    del run["action_space"]  # as run.json was written before bits_mode existed
    (out / "run.json").write_text(json.dumps(run))
    with pytest.raises(SearchError, match="bits_mode=tied") as err:
        search("ARQ-LeNet5-v0", "random", 2, 0, out, env_kwargs=kw, resume=True,
               final_eval=False, progress=False, tensorboard=False)  # fmt: skip
    assert "\n" not in str(err.value)
