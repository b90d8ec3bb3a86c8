"""Optuna's samplers as search agents (optuna-tpe, optuna-cmaes): one trial per episode."""

from __future__ import annotations

import csv

import gymnasium as gym
import numpy as np
import pytest
import toy_env

pytest.importorskip("optuna")
pytest.importorskip("cmaes")

from arq_gym import agents  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NAMES = ["optuna-tpe", "optuna-cmaes"]


def toy(**kw) -> gym.Env:
    return gym.make(toy_env.register(), **kw)


def rewards(agent, episodes: int) -> list[float]:
    return [agent.run_episode()[0] for _ in range(episodes)]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("action_type", ["continuous", "discrete"])
def test_one_trial_per_episode_seeded(name, action_type):
    a = agents.make(name, toy(action_type=action_type), seed=3, n_startup_trials=3)
    b = agents.make(name, toy(action_type=action_type), seed=3, n_startup_trials=3)
    ra, rb = rewards(a, 8), rewards(b, 8)
    assert ra == rb  # same seed, same episodes
    assert len(a.study.trials) == 8 and all(t.value is not None for t in a.study.trials)
    assert [t.value for t in a.study.trials] == ra
    params = a.study.trials[0].params
    assert sorted(params) == [f"layer{i:02d}" for i in range(5)]
    c = agents.make(name, toy(action_type=action_type), seed=4, n_startup_trials=3)
    assert rewards(c, 8) != ra


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_resumes_exactly(name):
    whole = agents.make(name, toy(), seed=5, n_startup_trials=2)
    expected = rewards(whole, 7)
    first = agents.make(name, toy(), seed=5, n_startup_trials=2)
    got = rewards(first, 3)
    state = first.state_dict()
    second = agents.make(name, toy(), seed=5, n_startup_trials=2)
    second.load_state_dict(state)
    assert got + rewards(second, 4) == expected


def test_tpe_beats_its_random_start_on_the_toy_problem():
    a = agents.make("optuna-tpe", toy(), seed=0, n_startup_trials=10)
    r = rewards(a, 60)
    assert np.mean(r[-15:]) > np.mean(r[:10])
    assert max(r) > 0.9


def test_unknown_hyperparameter_and_greedy_replay():
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        agents.make("optuna-tpe", toy(), bogus=1)
    a = agents.make("optuna-tpe", toy(), seed=0, n_startup_trials=2)
    r = rewards(a, 6)
    replay, _ = a.run_episode(explore=False)  # the best trial's actions, nothing told
    assert replay == pytest.approx(max(r)) and len(a.study.trials) == 6


@pytest.mark.parametrize("bits_mode", ["wa", "tied"])
def test_search_on_lenet_suggests_bit_widths(bits_mode, data_dir, tmp_path):
    from arq_gym.experiments.search import search

    kw = {"fidelity": "smoke", "device": "cpu", "data_dir": str(data_dir), "bits_mode": bits_mode}
    res = search("ARQ-LeNet5-v0", "optuna-cmaes", 4, 0, tmp_path / "run", env_kwargs=kw,
                 final_eval=False, progress=False, tensorboard=False)  # fmt: skip
    assert res["episodes"] == 4
    with open(tmp_path / "run" / "episodes.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    agent = agents.make("optuna-tpe", gym.make("ARQ-LeNet5-v0", **kw), seed=0)
    agent.run_episode()
    params = agent.study.trials[0].params
    expect = 10 if bits_mode == "wa" else 5  # a weight and an activation bit-width per layer
    assert len(params) == expect and all(2 <= v <= 8 for v in params.values())
