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
    assert env.action_space == gym.spaces.Discrete(49)  # every (weight, activation) pair
    kwargs = _off_policy_kwargs()
    model = DQN("MlpPolicy", env, **kwargs)
    _learn(model)


def test_dqn_with_discretize_action_wrapper(env_kw):
    from gymnasium.wrappers import DiscretizeAction
    from stable_baselines3 import DQN

    wa = DiscretizeAction(gym.make("ARQ-ResNet20-v0", **env_kw), bins=7)
    assert wa.action_space == gym.spaces.Discrete(49)  # 7 bins for each of the two bit-widths
    env = DiscretizeAction(gym.make("ARQ-ResNet20-v0", bits_mode="tied", **env_kw), bins=7)
    assert env.action_space == gym.spaces.Discrete(7)
    # every bin of the wrapper lands on its own bit-width
    env.reset(seed=0)
    bits = [env.step(k)[4]["bits"] for k in range(7)]
    assert bits[1:] == [3, 4, 5, 6, 7, 8]  # layer 0 is pinned at 8 bits
    model = DQN("MlpPolicy", env, **_off_policy_kwargs())
    _learn(model)


# ---------------------------------------------------------------------- make_vec_env


def _ppo_on_vec_env(venv, layers: int) -> None:
    """PPO for 128 steps (2 envs x 64) on ``venv``; every finished episode is whole."""
    from stable_baselines3 import PPO

    model = PPO("MlpPolicy", venv, n_steps=64, batch_size=64, n_epochs=1, seed=0, device="cpu")
    model.learn(total_timesteps=128)
    assert model.num_timesteps == 128
    episodes = list(model.ep_info_buffer)
    assert len(episodes) == 2 * (64 // layers)  # each env finishes its whole episodes
    assert all(e["l"] == layers and math.isfinite(e["r"]) for e in episodes)


def _check_vec_images(venv) -> None:
    """make_vec_env asks for render_mode="rgb_array": each env draws its own picture."""
    assert venv.render_mode == "rgb_array"
    images = venv.get_images()
    assert len(images) == venv.num_envs == 2
    for img in images:
        assert isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.shape == (400, 640, 3)


def test_make_vec_env_dummy_resnet20_and_ppo(env_kw):
    """The issue's command: SB3's make_vec_env passes render_mode="rgb_array"."""
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import DummyVecEnv

    venv = make_vec_env("ARQ-ResNet20-v0", n_envs=2, env_kwargs=env_kw, vec_env_cls=DummyVecEnv,
                        seed=0)  # fmt: skip
    try:
        assert isinstance(venv, DummyVecEnv)
        _ppo_on_vec_env(venv, LAYERS)
        _check_vec_images(venv)
    finally:
        venv.close()


SUBPROC_SCRIPT = """
import json, sys
import arq_gym  # registers the ids, also in SubprocVecEnv's forkserver/spawn workers
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import SubprocVecEnv

if __name__ == "__main__":
    kw = {"fidelity": "smoke", "device": "cpu", "data_dir": sys.argv[1]}
    venv = make_vec_env("ARQ-LeNet5-v0", n_envs=2, env_kwargs=kw, vec_env_cls=SubprocVecEnv,
                        seed=0)
    model = PPO("MlpPolicy", venv, n_steps=64, batch_size=64, n_epochs=1, seed=0, device="cpu")
    model.learn(total_timesteps=128)
    images = venv.get_images()
    print(json.dumps({"cls": type(venv).__name__, "render_mode": venv.render_mode,
                      "timesteps": model.num_timesteps,
                      "episodes": [[e["l"], e["r"]] for e in model.ep_info_buffer],
                      "images": [[list(i.shape), str(i.dtype)] for i in images]}))
    venv.close()
"""


def test_make_vec_env_subproc_lenet_and_ppo(env_kw, tmp_path):
    """SubprocVecEnv as a user runs it: a script that imports arq_gym, SB3's default start
    method (forkserver where available), LeNet-5 (the cheaper model; same make_vec_env path)."""
    import json
    import subprocess
    import sys

    script = tmp_path / "vec.py"
    script.write_text(SUBPROC_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), env_kw["data_dir"]], capture_output=True,
                          text=True, timeout=600, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["cls"] == "SubprocVecEnv" and out["render_mode"] == "rgb_array"
    assert out["timesteps"] == 128
    assert len(out["episodes"]) == 2 * (64 // 5)
    assert all(length == 5 and math.isfinite(r) for length, r in out["episodes"])
    assert out["images"] == [[[400, 640, 3], "uint8"]] * 2


@pytest.mark.parametrize("algo", ["ddpg", "td3", "sac", "ppo"])
def test_the_sb3_search_example_agents_learn(algo, env_kw):
    """examples/sb3_search.py's agents on the separate-bits action space (LeNet-5, smoke)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "sb3_search.py"
    spec = importlib.util.spec_from_file_location("sb3_search_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    env = gym.make("ARQ-LeNet5-v0", **env_kw)
    model = example.make_agent(algo, env, episodes=4, seed=0)
    callback = example.BestEpisode()
    model.learn(total_timesteps=4 * env.unwrapped.num_layers, callback=callback)
    assert callback.episodes >= 4 and math.isfinite(callback.best_reward)
    assert len(callback.best_info["w_bits"]) == env.unwrapped.num_layers
