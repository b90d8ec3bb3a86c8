"""Black-box optimisers from Optuna as search agents: one trial per episode.

``optuna-tpe`` (the Tree-structured Parzen Estimator, :class:`optuna.samplers.TPESampler`) and
``optuna-cmaes`` (CMA-ES, :class:`optuna.samplers.CmaEsSampler`) treat a whole episode as one
evaluation of the reward function: at the first step of an episode the agent asks the study for
a trial, every step suggests that layer's parameters, and the episode's reward is told back.

Parameters per layer (``layer00``, ``layer01``, ...):

* on an arq-gym env with a Box action space (the default): one integer bit-width per action
  entry (``_w`` and ``_a`` with ``bits_mode="wa"``), in the env's ``bits`` range, sent as the
  centre of that bit-width's action bin, so the samplers search the bit-widths themselves;
* on another Box: one float per entry in the box's bounds;
* on a Discrete action space (``action_type="discrete"``, the pairs of ``bits_mode="wa"``
  included): one integer action index.

Seeded by the agent's seed; the study (with its sampler's random state) is part of the agent's
state, so a resumed search repeats an uninterrupted one. Needs ``pip install -e ".[optuna]"``.
Hyperparameters: ``n_startup_trials`` (random trials before the model is used: TPE's default 10,
CMA-ES's 0) and, for CMA-ES, ``sigma0`` (initial step size in the search space's scale).
"""

from __future__ import annotations

import pickle
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from .base import Agent

__all__ = ["OptunaCMAES", "OptunaTPE"]


def _optuna():
    try:
        import optuna
    except ModuleNotFoundError:
        raise ValueError("the optuna agents need Optuna: pip install -e \".[optuna]\"") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


class _OptunaAgent(Agent):
    """One Optuna trial per episode (see the module docstring); subclasses pick the sampler."""

    action_spaces = (spaces.Box, spaces.Discrete)
    default_startup = 10

    def __init__(self, env: gym.Env, seed: int = 0, **hparams: Any) -> None:
        self.n_startup_trials = int(hparams.pop("n_startup_trials", self.default_startup))
        self.sigma0 = hparams.pop("sigma0", None)
        if self.n_startup_trials < 0:
            raise ValueError(f"n_startup_trials must be >= 0, got {self.n_startup_trials}")
        super().__init__(env, seed, **hparams)
        space = env.action_space
        if isinstance(space, spaces.Box) and not (
            np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high))
        ):
            raise ValueError(f"agent {self.name!r} needs a bounded Box action space, got {space}")
        bits = getattr(env.unwrapped, "bits", None)
        self.bits = None if bits is None else (int(bits[0]), int(bits[1]))
        self.study = _optuna().create_study(direction="maximize", sampler=self._sampler())
        self._trial = None
        self._layer = 0

    def _sampler(self):
        raise NotImplementedError

    # ------------------------------------------------------------------ loop protocol

    def _suggest(self, trial, layer: int) -> Any:
        space = self.env.action_space
        name = f"layer{layer:02d}"
        if isinstance(space, spaces.Discrete):
            return int(space.start) + trial.suggest_int(name, 0, int(space.n) - 1)
        size = int(np.prod(space.shape))
        suffixes = ("_w", "_a") if size == 2 else [f"_{d}" for d in range(size)]
        if size == 1:
            suffixes = [""]
        low, high = space.low.reshape(-1), space.high.reshape(-1)
        values = []
        for d, suffix in enumerate(suffixes):
            if self.bits is not None:  # the centre of the bit-width's bin (HAQ mapping)
                lo, hi = self.bits
                b = trial.suggest_int(name + suffix, lo, hi)
                u = (b - lo + 0.5) / (hi - lo + 1)
                values.append(low[d] + u * (high[d] - low[d]))
            else:
                values.append(trial.suggest_float(name + suffix, float(low[d]), float(high[d])))
        return np.asarray(values, dtype=space.dtype).reshape(space.shape)

    def act(self, obs: np.ndarray, explore: bool = True) -> Any:
        if self._trial is None:
            if explore or not self.study.trials:
                self._trial = self.study.ask()
            else:  # the best trial so far, replayed
                best = self.study.best_trial
                self._trial = _optuna().trial.FixedTrial(best.params)
        action = self._suggest(self._trial, self._layer)
        self._layer += 1
        return action

    def end_episode(self, reward: float, info: dict) -> None:
        trial, self._trial, self._layer = self._trial, None, 0
        if trial is not None and not isinstance(trial, _optuna().trial.FixedTrial):
            self.study.tell(trial, float(reward))
        super().end_episode(reward, info)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {"study": pickle.dumps(self.study)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.study = pickle.loads(state["study"])
        self._trial, self._layer = None, 0


class OptunaTPE(_OptunaAgent):
    """Optuna's TPE sampler, one trial per episode (``optuna-tpe``)."""

    name = "optuna-tpe"
    default_startup = 10

    def _sampler(self):
        optuna = _optuna()
        return optuna.samplers.TPESampler(seed=self.seed, n_startup_trials=self.n_startup_trials)


class OptunaCMAES(_OptunaAgent):
    """Optuna's CMA-ES sampler, one trial per episode (``optuna-cmaes``)."""

    name = "optuna-cmaes"
    default_startup = 0

    def _sampler(self):
        optuna = _optuna()
        try:
            import cmaes  # noqa: F401 - the sampler imports it lazily; fail here, in one line
        except ModuleNotFoundError:
            raise ValueError("optuna-cmaes needs the cmaes package: pip install -e "
                             "\".[optuna]\"") from None  # fmt: skip
        return optuna.samplers.CmaEsSampler(seed=self.seed, sigma0=self.sigma0,
                                            n_startup_trials=self.n_startup_trials)  # fmt: skip
