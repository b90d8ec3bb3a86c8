"""Random search: every action drawn uniformly from the action space.

The baseline every learning agent has to beat. With the HAQ action mapping a uniform action in
[-1, 1] gives every bit-width in [min, max] the same probability, so each episode is a uniformly
random per-layer bit assignment (before budget enforcement).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from .base import Agent

__all__ = ["RandomSearch"]


class RandomSearch(Agent):
    """Uniformly random actions on a Box or Discrete action space; learns nothing.

    Draws from the agent's own generator (seeded by ``seed``), so a run is reproducible and
    resumes exactly.
    """

    name = "random"
    action_spaces = (spaces.Box, spaces.Discrete)

    def __init__(self, env: gym.Env, seed: int = 0, **hparams: Any) -> None:
        super().__init__(env, seed, **hparams)
        space = env.action_space
        if isinstance(space, spaces.Box) and not (
            np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high))
        ):
            raise ValueError(f"agent 'random' needs a bounded Box action space, got {space}")

    def act(self, obs: np.ndarray, explore: bool = True) -> Any:
        space = self.env.action_space
        if isinstance(space, spaces.Discrete):
            return int(space.start + self.rng.integers(space.n))
        return self.rng.uniform(space.low, space.high).astype(space.dtype)
