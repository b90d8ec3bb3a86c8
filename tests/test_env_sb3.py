"""Stable-Baselines3 agents drive ARQ-ResNet20-v0 (fidelity smoke) for a few episodes."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest

import arq_gym  # noqa: F401  (registers the ids)

EPISODES = 3
LAYERS = 20


@pytest.fixture(scope="module")
def env_kw(data_dir) -> dict:
    return {"fidelity": "smoke", "device": "cpu", "data_dir": str(data_dir)}


def _learn(model) -> None:
    model.learn(total_timesteps=EPISODES * LAYERS)
    episodes = list(model.ep_info_buffer)
    assert len(episodes) == EPISODES
    assert all(e["l"] == LAYERS and math.isfinite(e["r"]) for e in episodes)


def _off_policy_kwargs() -> dict:
    return {"learning_starts": 2 * LAYERS, "batch_size": 16, "train_freq": 1,
            "gradient_steps": 1, "buffer_size": 1_000, "seed": 0, "device": "cpu"}  # fmt: skip


@pytest.mark.parametrize("algo", ["DDPG", "TD3", "SAC"])
def test_off_policy_continuous_agents(algo, env_kw):
    import stable_baselines3 as sb3
    from stable_baselines3.common.noise import NormalActionNoise

    env = gym.make("ARQ-ResNet20-v0", **env_kw)
    kwargs = _off_policy_kwargs()
    if algo != "SAC":
        kwargs["action_noise"] = NormalActionNoise(np.zeros(1), 0.5 * np.ones(1))
    model = getattr(sb3, algo)("MlpPolicy", env, **kwargs)
    _learn(model)
    # the trained policy maps observations to valid actions
    obs, _ = env.reset(seed=0)
    action, _ = model.predict(obs, deterministic=True)
    assert env.action_space.contains(action.astype(np.float32))


@pytest.mark.parametrize("algo", ["PPO", "A2C"])
def test_on_policy_agents(algo, env_kw):
    import stable_baselines3 as sb3

    env = gym.make("ARQ-ResNet20-v0", **env_kw)
    extra = {"n_steps": LAYERS, "batch_size": LAYERS} if algo == "PPO" else {"n_steps": 5}
    model = getattr(sb3, algo)("MlpPolicy", env, seed=0, device="cpu", **extra)
    _learn(model)


def test_dqn_with_discrete_action_type(env_kw):
    from stable_baselines3 import DQN

    env = gym.make("ARQ-ResNet20-v0", action_type="discrete", **env_kw)
    assert env.action_space == gym.spaces.Discrete(7)
    kwargs = _off_policy_kwargs()
    model = DQN("MlpPolicy", env, **kwargs)
    _learn(model)


def test_dqn_with_discretize_action_wrapper(env_kw):
    from gymnasium.wrappers import DiscretizeAction
    from stable_baselines3 import DQN

    env = DiscretizeAction(gym.make("ARQ-ResNet20-v0", **env_kw), bins=7)
    assert env.action_space == gym.spaces.Discrete(7)
    # every bin of the wrapper lands on its own bit-width
    env.reset(seed=0)
    bits = [env.step(k)[4]["bits"] for k in range(7)]
    assert bits[1:] == [3, 4, 5, 6, 7, 8]  # layer 0 is pinned at 8 bits
    model = DQN("MlpPolicy", env, **_off_policy_kwargs())
    _learn(model)
