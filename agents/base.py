"""The one interface every search agent implements.

An agent searches an environment with the arq-gym contract (one step per layer, a sparse reward
on the last step) episode by episode. Two ways to write one:

* **The loop protocol** (subclass :class:`Agent`): implement ``act(obs, explore=True)`` and,
  if it learns, ``observe(transition)`` and ``end_episode(reward, info)``. The base class runs
  the Gymnasium loop (:meth:`Agent.run_episode`), drives many episodes (:meth:`Agent.run`) and
  saves its state for ``--resume`` (:meth:`Agent.state_dict`, :meth:`Agent.load_state_dict`).
* **Duck typing**: any class with ``__init__(env, seed, **hparams)`` and
  ``run_episode() -> (reward, info)`` works too (``examples/custom_agent.py``); it is wrapped in
  :class:`ExternalAgent`. Its attributes (other than the env) are pickled for resume unless it
  defines its own ``state_dict()`` / ``load_state_dict(state)``.

Agents that drive a library's own training loop (Stable-Baselines3's ``learn``) override
:meth:`Agent.run` instead of the loop protocol and call ``record`` at every episode end and
``checkpoint`` whenever their state is consistent.
"""

from __future__ import annotations

import contextlib
import copy
import pickle
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from gymnasium import spaces

__all__ = [
    "Agent",
    "ExternalAgent",
    "Transition",
    "check_action_space",
    "agent_rng",
    "episode_length",
    "torch_threads",
]

#: ``record(reward, info)``: called by an agent once per finished episode.
RecordFn = Callable[[float, dict], None]
#: ``checkpoint()``: called by an agent when its state may be saved (after ``record``).
CheckpointFn = Callable[[], None]


@dataclass
class Transition:
    """One environment step as the loop protocol hands it to :meth:`Agent.observe`."""

    obs: np.ndarray
    action: Any
    reward: float
    next_obs: np.ndarray
    terminated: bool
    truncated: bool
    info: dict = field(default_factory=dict)


def _space_name(space: gym.Space) -> str:
    return type(space).__name__


def check_action_space(name: str, env: gym.Env, allowed: tuple[type[gym.Space], ...]) -> None:
    """Raise a one-line ValueError when ``env``'s action space is not one of ``allowed``."""
    if not isinstance(env.action_space, allowed):
        kinds = " or ".join(t.__name__ for t in allowed)
        hint = ""
        if spaces.Box in allowed and isinstance(env.action_space, spaces.Discrete):
            hint = " (make the env with action_type=continuous)"
        elif spaces.Discrete in allowed and isinstance(env.action_space, spaces.Box):
            hint = " (make the env with action_type=discrete)"
        raise ValueError(
            f"agent {name!r} needs {kinds} actions but the env has {env.action_space}{hint}"
        )


def agent_rng(name: str, seed: int) -> np.random.Generator:
    """The generator of agent ``name`` with ``seed``: one stream per (agent, seed), so that
    agents compared with the same seed do not draw the same random actions (arq-ddpg's
    warm-up would otherwise repeat random search episode for episode)."""
    return np.random.default_rng([int(seed), zlib.crc32(name.encode())])


@contextlib.contextmanager
def torch_threads(n: int = 1) -> Iterator[None]:
    """Run the block with at most ``n`` torch intra-op threads, then restore the previous
    number.

    The agents' networks are small MLPs: one thread is faster than several, and much faster
    on a loaded machine (measured: 3 ms against 50-450 ms per DDPG update on 2 busy cores),
    while the env's certification keeps the threads the process has: the thread setting
    (``ARQ_GYM_THREADS`` / ``--threads``, :mod:`arq_gym.threads`), which this never exceeds.
    """
    from arq_gym.threads import limited_threads

    with limited_threads(n):
        yield


def episode_length(env: gym.Env, default: int = 20) -> int:
    """Steps per episode of an arq-gym env (its number of quantizable layers).

    Looks for ``num_layers`` on the unwrapped env or on its ``problem``; ``default`` otherwise.
    """
    base = env.unwrapped
    for obj in (base, getattr(base, "problem", None)):
        n = getattr(obj, "num_layers", None) if obj is not None else None
        if isinstance(n, (int, np.integer)) and n > 0:
            return int(n)
    return default


class Agent:
    """Base class of search agents (loop protocol).

    Args:
        env: a Gymnasium env (arq-gym contract: sparse reward on the last step).
        seed: seeds everything random in the agent; with a deterministic env, two runs with
            the same seed give the same episodes.
        **hparams: agent-specific hyperparameters; unknown names raise ValueError.

    Subclasses set :attr:`name` and :attr:`action_spaces`, read their hyperparameters in
    ``__init__`` and implement :meth:`act` (plus :meth:`observe` / :meth:`end_episode` to learn).
    The state returned by :meth:`state_dict` must be picklable and restore the agent exactly
    (networks, optimizers, replay buffer, random generators), so that a resumed search repeats
    an uninterrupted one.
    """

    #: short name shown in logs
    name: ClassVar[str] = "agent"
    #: action spaces the agent can drive
    action_spaces: ClassVar[tuple[type[gym.Space], ...]] = (spaces.Box, spaces.Discrete)

    def __init__(self, env: gym.Env, seed: int = 0, **hparams: Any) -> None:
        if hparams:
            raise ValueError(
                f"agent {self.name!r} got unknown hyperparameter(s): {', '.join(sorted(hparams))}"
            )
        check_action_space(self.name, env, self.action_spaces)
        self.env = env
        self.seed = int(seed)
        self.rng = agent_rng(self.name, self.seed)
        self.episodes_done = 0
        self._steps = 0

    # ------------------------------------------------------------------ loop protocol

    def act(self, obs: np.ndarray, explore: bool = True) -> Any:
        """The action for observation ``obs`` (``explore=False``: the greedy action)."""
        raise NotImplementedError

    def observe(self, transition: Transition) -> None:
        """Called after every step with what happened (default: nothing)."""

    def end_episode(self, reward: float, info: dict) -> None:
        """Called once per episode with its final reward and terminal info (default: nothing).

        Subclasses that override this should call ``super().end_episode(reward, info)``.
        """
        self.episodes_done += 1

    # ------------------------------------------------------------------ driving

    def run_episode(self, explore: bool = True) -> tuple[float, dict]:
        """Play one episode with the loop protocol; returns ``(episode reward, terminal info)``."""
        obs, _ = self.env.reset(seed=self.seed if self._steps == 0 else None)
        total = 0.0
        while True:
            action = self.act(obs, explore=explore)
            next_obs, reward, terminated, truncated, info = self.env.step(action)
            self._steps += 1
            total += float(reward)
            self.observe(
                Transition(
                    obs, action, float(reward), next_obs, bool(terminated), bool(truncated), info
                )
            )
            obs = next_obs
            if terminated or truncated:
                break
        self.end_episode(total, info)
        return total, info

    def run(self, episodes: int, record: RecordFn, checkpoint: CheckpointFn | None = None) -> None:
        """Play ``episodes`` more episodes, calling ``record(reward, info)`` after each and then
        ``checkpoint()`` (when given)."""
        for _ in range(int(episodes)):
            reward, info = self.run_episode()
            record(reward, info)
            if checkpoint is not None:
                checkpoint()

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Picklable state restoring the agent exactly (base: RNG and counters)."""
        return {
            "rng": copy.deepcopy(self.rng.bit_generator.state),
            "episodes_done": self.episodes_done,
            "steps": self._steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.rng.bit_generator.state = state["rng"]
        self.episodes_done = int(state["episodes_done"])
        self._steps = int(state["steps"])

    def close(self) -> None:
        """Release resources (default: nothing; the env is closed by its owner)."""


class ExternalAgent(Agent):
    """Adapter for a duck-typed user agent: an object with ``run_episode() -> (reward, info)``."""

    name = "external"

    def __init__(self, inner: Any, env: gym.Env, seed: int = 0) -> None:
        self.inner = inner
        self.name = type(inner).__name__
        self.env = env
        self.seed = int(seed)
        self.rng = agent_rng(self.name, self.seed)
        self.episodes_done = 0
        self._steps = 0
        self._warned = False

    def run_episode(self, explore: bool = True) -> tuple[float, dict]:
        reward, info = self.inner.run_episode()
        self.episodes_done += 1
        return float(reward), dict(info)

    def state_dict(self) -> dict[str, Any]:
        if hasattr(self.inner, "state_dict"):
            inner = self.inner.state_dict()
        else:
            inner = {k: v for k, v in vars(self.inner).items() if v is not self.env}
            try:
                pickle.dumps(inner)
            except Exception as exc:  # noqa: BLE001 - any pickling failure
                if not self._warned:
                    warnings.warn(
                        f"agent {self.name}: its state cannot be pickled ({exc}); a resumed "
                        "search restarts it from scratch (define state_dict/load_state_dict)",
                        stacklevel=2,
                    )
                    self._warned = True
                inner = None
        return {"episodes_done": self.episodes_done, "inner": inner}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.episodes_done = int(state["episodes_done"])
        inner = state.get("inner")
        if inner is None:
            return
        if hasattr(self.inner, "load_state_dict"):
            self.inner.load_state_dict(inner)
        else:
            vars(self.inner).update(inner)
