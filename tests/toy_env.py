"""A tiny deterministic env with the arq-gym contract, for fast agent and search tests.

Five steps; Box(-1, 1, (1,)) actions (or Discrete(7) with ``action_type="discrete"``);
observation ``[step / 5, previous action in [0, 1]]``; reward 0 until the last step, then
``1 - mean((a_i - target_i)^2)``. The terminal info carries the arq-gym keys the search loop
reads (bits mapped HAQ-style from the actions, made-up accuracy figures).
"""

from __future__ import annotations

import time

import gymnasium as gym
import numpy as np
from gymnasium import spaces

TARGETS = np.array([0.5, -0.5, 0.2, 0.8, -0.1])


class ToyEnv(gym.Env):
    """Deterministic 5-step env with a sparse final reward (see the module docstring)."""

    metadata = {"render_modes": []}
    num_layers = len(TARGETS)

    def __init__(self, action_type: str = "continuous", delay: float = 0.0) -> None:
        self.action_type = action_type
        self.delay = float(delay)
        if action_type == "discrete":
            self.action_space = spaces.Discrete(7)
        else:
            self.action_space = spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.observation_space = spaces.Box(0.0, 1.0, (2,), np.float32)
        self._t = 0
        self._actions: list[float] = []
        self.evaluations = 0

    def _obs(self) -> np.ndarray:
        prev = (self._actions[-1] + 1) / 2 if self._actions else 0.0
        return np.array([self._t / len(TARGETS), prev], np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._t = 0
        self._actions = []
        return self._obs(), {}

    def step(self, action):
        if self.action_type == "discrete":
            a = -1.0 + 2.0 * int(action) / 6
        else:
            a = float(np.clip(np.asarray(action, np.float64).reshape(-1)[0], -1.0, 1.0))
        self._actions.append(a)
        self._t += 1
        done = self._t == len(TARGETS)
        if not done:
            return self._obs(), 0.0, False, False, {}
        self.evaluations += 1
        if self.delay:
            time.sleep(self.delay)
        acts = np.array(self._actions)
        reward = float(1.0 - np.mean((acts - TARGETS) ** 2))
        bits = [int(np.clip(round(1.5 + (x + 1) / 2 * 7), 2, 8)) for x in acts]
        info = {
            "w_bits": bits, "a_bits": bits, "requested_bits": bits,
            "bops": float(sum(b * b for b in bits)), "bops_fraction": sum(b * b for b in bits) / 5120,
            "budget": 0.05, "acr": reward / 2, "certified_accuracy": {"0.25": reward / 3},
            "clean_accuracy": reward / 1.5, "abstain_rate": 0.1, "fp_acr": 0.5,
            "reward_name": "acr", "eval_seconds": 0.0, "cache_hit": False,
        }  # fmt: skip
        return self._obs(), reward, True, False, info


def register() -> str:
    """Register the toy env as ``ArqToy-v0`` (idempotent); returns the id."""
    if "ArqToy-v0" not in gym.registry:
        gym.register("ArqToy-v0", entry_point=ToyEnv)
    return "ArqToy-v0"


register()
