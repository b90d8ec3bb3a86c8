"""rl-zoo3 with the shipped hyperparameters (arq_gym/hyperparams/*.yml).

The files must cover every registered id, be sized in that id's episodes, and train through
``python -m rl_zoo3.train`` exactly as the README says (here at smoke fidelity, a few episodes).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from importlib import resources

import pytest
import torch.nn as nn

from arq_gym import hyperparams
from arq_gym.envs import ENV_SPECS
from arq_gym.models.architectures import build

yaml = pytest.importorskip("yaml", reason="PyYAML comes with rl_zoo3 (the dev and zoo extras)")

ZOO_ENV = "ARQ-LeNet5-v0"  # 5 steps per episode: the cheapest registered id


def episode_length(env_id: str) -> int:
    """Steps per episode of ``env_id``: one per conv / linear layer of its model."""
    spec = ENV_SPECS[env_id]
    model = build(spec["model"], spec["dataset"])
    return sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())


def load(algo: str) -> dict:
    with open(hyperparams.path(algo)) as f:
        return yaml.safe_load(f)


def test_episode_lengths_are_the_documented_ones():
    assert episode_length("ARQ-ResNet20-v0") == 20 and episode_length("ARQ-LeNet5-v0") == 5


def test_files_ship_in_the_package_and_path_rejects_unknown_algos():
    shipped = resources.files("arq_gym.hyperparams")
    for algo in ("td3", "sac", "ppo", "a2c", "dqn"):
        assert algo in hyperparams.ALGOS
        assert shipped.joinpath(f"{algo}.yml").is_file()
        assert hyperparams.path(algo).is_file()
        assert hyperparams.path(algo.upper()).name == f"{algo}.yml"
    with pytest.raises(ValueError, match="no rl-zoo3 hyperparameters for 'ddpg'; shipped: a2c"):
        hyperparams.path("ddpg")


@pytest.mark.parametrize("algo", hyperparams.ALGOS)
def test_hyperparameters_cover_every_id_in_episodes(algo):
    table = load(algo)
    # ARQ-Custom-v0's episode length is the user's model's: no entry can be sized for it
    sized = {k for k, spec in ENV_SPECS.items() if spec["model"] is not None}
    assert set(table) == sized, f"{algo}.yml must have one entry per registered id with a model"
    for env_id, hp in table.items():
        L = episode_length(env_id)
        assert hp["policy"] == "MlpPolicy" and hp["gamma"] == 1.0
        # a real search: a few hundred episodes
        assert hp["n_timesteps"] % L == 0 and 100 <= hp["n_timesteps"] // L <= 1000
        if algo in ("td3", "sac", "dqn"):
            assert hp["learning_starts"] % L == 0 and 5 <= hp["learning_starts"] // L <= 50
            assert hp["buffer_size"] % L == 0 and hp["buffer_size"] > hp["learning_starts"]
            assert hp["train_freq"] == [1, "episode"]
        else:
            assert hp["n_steps"] % L == 0
            assert hp.get("batch_size", hp["n_steps"]) % L == 0
        if algo == "dqn":
            assert hp["env_kwargs"] == {"action_type": "discrete"}
        else:
            assert "env_kwargs" not in hp


def test_python_m_prints_the_path():
    out = subprocess.run([sys.executable, "-m", "arq_gym.hyperparams", "ppo"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(hyperparams.path("ppo"))
    bad = subprocess.run([sys.executable, "-m", "arq_gym.hyperparams", "nope"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "no rl-zoo3 hyperparameters for 'nope'" in bad.stderr


# (algo, timesteps, overrides): TD3 explores randomly for 5 episodes instead of the file's 20 so
# that the test also trains; PPO runs two rollouts of the file's n_steps (4 episodes each).
RUNS = [("td3", 60, ["-params", "learning_starts:25"]), ("ppo", 40, [])]


@pytest.mark.parametrize("algo, steps, extra", RUNS, ids=[r[0] for r in RUNS])
def test_rl_zoo3_trains_with_the_shipped_file(algo, steps, extra, tmp_path, data_dir):
    pytest.importorskip("rl_zoo3")
    from stable_baselines3 import PPO, TD3

    logs = tmp_path / "logs"
    cmd = [sys.executable, "-m", "rl_zoo3.train", "--algo", algo, "--env", ZOO_ENV,
           "--gym-packages", "arq_gym", "--conf-file", str(hyperparams.path(algo)),
           "--env-kwargs", "fidelity:'smoke'", "-n", str(steps), "--eval-freq", "-1",
           "--seed", "0", "--num-threads", "1", "-f", str(logs), *extra]  # fmt: skip
    env = dict(os.environ, ARQ_GYM_DATA=str(data_dir), OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-3000:])

    run_dir = logs / algo / f"{ZOO_ENV}_1"
    with open(run_dir / "0.monitor.csv") as f:
        next(f)  # the monitor's JSON header
        episodes = list(csv.DictReader(f))
    assert len(episodes) == steps // 5
    assert all(int(e["l"]) == 5 and 0.0 <= float(e["r"]) <= 5.0 for e in episodes)

    model = {"td3": TD3, "ppo": PPO}[algo].load(run_dir / f"{ZOO_ENV}.zip", device="cpu")
    assert model.num_timesteps == steps and model._n_updates > 0
    assert model.gamma == 1.0  # from the shipped file (SB3's defaults are 0.99)
    if algo == "td3":
        assert model.policy_kwargs["net_arch"] == [300, 300] and model.tau == 0.01
        assert model.learning_starts == 25 and model.buffer_size == 640
    else:
        assert model.n_steps == 20 and model.batch_size == 5 and model.n_epochs == 10
