"""Stable-Baselines3 agents (DDPG, TD3, SAC, PPO, A2C, DQN) with defaults for arq-gym.

SB3's defaults are tuned for long dense-reward tasks (PPO collects 2,048 steps per update,
DQN waits 100 steps before learning and updates every 4 steps). An arq-gym episode has one step
per layer (7 for LeNet-5, 20 for ResNet-20), a single reward at its end, and a search lasts
tens to hundreds of episodes, so the defaults here are set in *episodes* (``L`` = episode
length, read from the env):

=============  =====================================================================
all            ``gamma = 1.0``: the horizon is short and finite and the only reward is
               at the end; discounting would only shrink the signal reaching the early
               layers (0.99^19 = 0.83 for ResNet-20) without reducing variance.
DDPG/TD3/SAC   ``learning_starts = 5 L`` (five episodes of uniformly random actions, like
               HAQ's warm-up), ``train_freq = (1, "episode")`` with ``gradient_steps = -1``
               (after each episode as many updates as steps, as HAQ does), replay buffer
               ``128 L`` (HAQ), ``batch_size = 64``, ``tau = 0.01`` (HAQ).
DDPG/TD3       two hidden layers of 300 (HAQ) and Gaussian action noise of std 0.5 in the
               [-1, 1] action units (SB3 adds none by default, so DDPG would not explore;
               0.5 is HAQ's initial std after about 70 episodes of its decay).
PPO            ``n_steps = 4 L`` (four whole episodes per update instead of ~100),
               ``batch_size = L`` (four minibatches), ``n_epochs = 10``.
A2C            ``n_steps = L``: one whole episode per update, so the return of every
               step is the final reward itself rather than a bootstrap from an untrained
               critic (SB3's default of 5 steps would bootstrap three times per episode).
DQN            (``action_type="discrete"`` envs) ``learning_starts = 5 L``, one update
               round per episode (``gradient_steps = -1``), target network refreshed every
               2 episodes, epsilon decaying over the first half of the search.
=============  =====================================================================

Any SB3 constructor argument can be overridden through hyperparameters
(``--agent-kwargs learning_rate=3e-4`` on the command line).

The search is driven by SB3's own ``learn``: one call per episode for the off-policy
algorithms and one per rollout for PPO/A2C, with a callback that records each finished episode.
After each call the model, its optimizer and the replay buffer are saved for ``--resume``
(``model.save`` / ``save_replay_buffer``). A resumed SB3 search keeps every completed episode
exactly once, but it is not bit-identical to an uninterrupted run: random generator states and
an on-policy rollout cut by the interruption are not restored.
"""

from __future__ import annotations

import io
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from stable_baselines3 import A2C, DDPG, DQN, PPO, SAC, TD3
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.noise import NormalActionNoise
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm

from .base import Agent, CheckpointFn, RecordFn, episode_length

__all__ = ["SB3Agent", "SB3DDPG", "SB3TD3", "SB3SAC", "SB3PPO", "SB3A2C", "SB3DQN", "defaults"]

_DROP_INFO = ("terminal_observation", "episode", "TimeLimit.truncated")


def defaults(algo: str, env: gym.Env) -> dict[str, Any]:
    """The arq-gym default constructor arguments of SB3 algorithm ``algo`` for ``env``."""
    L = episode_length(env)
    off_policy = {
        "gamma": 1.0, "learning_starts": 5 * L, "train_freq": (1, "episode"),
        "gradient_steps": -1, "buffer_size": 128 * L, "batch_size": 64,
    }  # fmt: skip
    n_act = int(np.prod(env.action_space.shape)) if isinstance(env.action_space, spaces.Box) else 1
    noise = NormalActionNoise(mean=np.zeros(n_act), sigma=0.5 * np.ones(n_act))
    table: dict[str, dict[str, Any]] = {
        "ddpg": off_policy
        | {"tau": 0.01, "action_noise": noise, "policy_kwargs": {"net_arch": [300, 300]}},
        "td3": off_policy
        | {"tau": 0.01, "action_noise": noise, "policy_kwargs": {"net_arch": [300, 300]}},
        "sac": off_policy | {"tau": 0.01},
        "ppo": {"gamma": 1.0, "n_steps": 4 * L, "batch_size": L, "n_epochs": 10},
        "a2c": {"gamma": 1.0, "n_steps": L},
        "dqn": off_policy
        | {
            "target_update_interval": 2 * L,
            "exploration_fraction": 0.5,
            "exploration_final_eps": 0.05,
        },
    }
    return table[algo]


class _EpisodeRecorder(BaseCallback):
    """Calls ``record(reward, info)`` at every episode end; stops ``learn`` at the target."""

    def __init__(self, record: RecordFn, target: int, planned_steps: int, stop: bool) -> None:
        super().__init__(verbose=0)
        self.stop = stop
        self.record = record
        self.target = target
        self.count = 0
        self.planned_steps = planned_steps
        self.episode_reward = 0.0

    def _on_training_start(self) -> None:
        # learn() is called once per episode/rollout: keep SB3's schedules (DQN's epsilon,
        # learning-rate schedules) on the scale of the whole search, not of one call.
        self.model._total_timesteps = max(self.planned_steps, self.model.num_timesteps + 1)

    # SB3's networks are small MLPs: train them on one thread (see agents.base.torch_threads),
    # collect rollouts (the env certifies) with the process's thread setting (arq_gym.threads).
    def _on_rollout_end(self) -> None:
        import contextlib

        from arq_gym.threads import limited_threads

        self._restore_threads()
        self._threads = contextlib.ExitStack()
        self._threads.enter_context(limited_threads(1))

    def _restore_threads(self) -> None:
        if getattr(self, "_threads", None) is not None:
            self._threads.close()
            self._threads = None

    def _on_rollout_start(self) -> None:
        self._restore_threads()

    def _on_training_end(self) -> None:
        self._restore_threads()

    def _on_step(self) -> bool:
        self.episode_reward += float(self.locals["rewards"][0])
        if bool(self.locals["dones"][0]):
            info = {k: v for k, v in self.locals["infos"][0].items() if k not in _DROP_INFO}
            reward, self.episode_reward = self.episode_reward, 0.0
            self.count += 1
            self.record(reward, info)
            if self.stop and self.count >= self.target:
                return False  # an on-policy rollout would run past the last episode
        return True


class SB3Agent(Agent):
    """Runs an SB3 algorithm on the env; hyperparameters are SB3 constructor arguments.

    ``device`` defaults to "cpu" (small MLPs run faster there than on a GPU).
    """

    algo: ClassVar[str] = ""
    algo_class: ClassVar[type[BaseAlgorithm]]

    def __init__(self, env: gym.Env, seed: int = 0, **hparams: Any) -> None:
        super().__init__(env, seed)
        kwargs = defaults(self.algo, env) | {"device": "cpu"} | hparams
        self._kwargs = kwargs
        try:
            self.model = self.algo_class("MlpPolicy", env, seed=self.seed, verbose=0, **kwargs)
        except TypeError as exc:
            raise ValueError(f"agent {self.name!r}: {exc}") from None
        self._quiet_logger()

    def _quiet_logger(self) -> None:
        # without tensorboard_log SB3 makes a fresh logger, and an empty temporary folder, on
        # every learn() call: one per episode here. One silent logger for the whole search.
        if not self._kwargs.get("tensorboard_log"):
            self.model.set_logger(Logger(folder=None, output_formats=[]))

    def act(self, obs: np.ndarray, explore: bool = True) -> Any:
        action, _ = self.model.predict(obs, deterministic=not explore)
        return action

    def run(self, episodes: int, record: RecordFn, checkpoint: CheckpointFn | None = None) -> None:
        L = episode_length(self.env)
        target = int(episodes)
        # off-policy: learn(1) collects exactly one episode (train_freq in episodes), stores it
        # and trains; on-policy: one rollout, cut at the last wanted episode
        stop = not isinstance(self.model, OffPolicyAlgorithm)
        cb = _EpisodeRecorder(self._count_and(record), target,
                              (self.episodes_done + target) * L, stop)  # fmt: skip
        while cb.count < target:
            self.model.learn(
                total_timesteps=1, reset_num_timesteps=False, callback=cb, progress_bar=False
            )
            if checkpoint is not None:
                checkpoint()

    def _count_and(self, record: RecordFn) -> RecordFn:
        def rec(reward: float, info: dict) -> None:
            self.episodes_done += 1
            record(reward, info)

        return rec

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        buf = io.BytesIO()
        self.model.save(buf)
        state["model"] = buf.getvalue()
        if isinstance(self.model, OffPolicyAlgorithm):
            rb = io.BytesIO()
            self.model.save_replay_buffer(rb)
            state["replay_buffer"] = rb.getvalue()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.model = self.algo_class.load(
            io.BytesIO(state["model"]), env=self.env, device=self._kwargs.get("device", "cpu")
        )
        if "replay_buffer" in state and isinstance(self.model, OffPolicyAlgorithm):
            self.model.load_replay_buffer(io.BytesIO(state["replay_buffer"]))
        self._quiet_logger()


class SB3DDPG(SB3Agent):
    """SB3 DDPG (Box actions)."""

    name, algo, algo_class, action_spaces = "sb3-ddpg", "ddpg", DDPG, (spaces.Box,)


class SB3TD3(SB3Agent):
    """SB3 TD3 (Box actions)."""

    name, algo, algo_class, action_spaces = "sb3-td3", "td3", TD3, (spaces.Box,)


class SB3SAC(SB3Agent):
    """SB3 SAC (Box actions)."""

    name, algo, algo_class, action_spaces = "sb3-sac", "sac", SAC, (spaces.Box,)


class SB3PPO(SB3Agent):
    """SB3 PPO (Box or Discrete actions)."""

    name, algo, algo_class = "sb3-ppo", "ppo", PPO
    action_spaces = (spaces.Box, spaces.Discrete)


class SB3A2C(SB3Agent):
    """SB3 A2C (Box or Discrete actions)."""

    name, algo, algo_class = "sb3-a2c", "a2c", A2C
    action_spaces = (spaces.Box, spaces.Discrete)


class SB3DQN(SB3Agent):
    """SB3 DQN (Discrete actions: make the env with ``action_type="discrete"``)."""

    name, algo, algo_class, action_spaces = "sb3-dqn", "dqn", DQN, (spaces.Discrete,)
