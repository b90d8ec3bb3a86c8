"""Search agents for arq-gym: the paper's DDPG, random search, Stable-Baselines3 runners.

Installed as ``arq_gym.agents`` (the source lives in the repository's ``agents/`` folder).
``arq_gym.agents.get(name)`` returns an agent class: a built-in name (:data:`BUILTIN`) or an
import path ``"package.module:Class"`` / ``"path/to/file.py:Class"`` for a user's own agent.
``arq_gym.agents.make(name, env, seed, **hparams)`` builds one, ready to ``run``. See
:mod:`arq_gym.agents.base` for the interface and ``examples/custom_agent.py`` for a user's
agent.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

import gymnasium as gym

from .base import Agent, ExternalAgent, Transition, check_action_space

__all__ = ["BUILTIN", "Agent", "ExternalAgent", "Transition", "available", "get", "make"]

#: built-in agent names -> import paths (imported lazily: SB3 is only loaded when used)
BUILTIN: dict[str, str] = {
    "arq-ddpg": "arq_gym.agents.arq_ddpg:ARQDDPG",
    "random": "arq_gym.agents.random_search:RandomSearch",
    "sb3-ddpg": "arq_gym.agents.sb3:SB3DDPG",
    "sb3-td3": "arq_gym.agents.sb3:SB3TD3",
    "sb3-sac": "arq_gym.agents.sb3:SB3SAC",
    "sb3-ppo": "arq_gym.agents.sb3:SB3PPO",
    "sb3-a2c": "arq_gym.agents.sb3:SB3A2C",
    "sb3-dqn": "arq_gym.agents.sb3:SB3DQN",
    "optuna-tpe": "arq_gym.agents.optuna_search:OptunaTPE",
    "optuna-cmaes": "arq_gym.agents.optuna_search:OptunaCMAES",
}


def available() -> list[str]:
    """Names of the built-in agents."""
    return list(BUILTIN)


def _import_module(mod: str, spec_text: str):
    if mod.endswith(".py") or "/" in mod or "\\" in mod:
        path = Path(mod)
        if not path.is_file():
            raise ValueError(f"agent {spec_text!r}: file {mod} does not exist")
        name = path.stem
        if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(
            path.resolve()
        ):
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, path.resolve())
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise ValueError(f"agent {spec_text!r}: importing {mod} failed: {exc}") from None
        return module
    try:
        return importlib.import_module(mod)
    except ModuleNotFoundError as exc:
        # console scripts do not put the working directory on sys.path; try it once
        cwd = str(Path.cwd())
        if exc.name and mod.split(".")[0] == exc.name.split(".")[0] and cwd not in sys.path:
            sys.path.append(cwd)
            try:
                return importlib.import_module(mod)
            except ModuleNotFoundError:
                pass
            finally:
                sys.path.remove(cwd)
        raise ValueError(f"agent {spec_text!r}: cannot import module {mod!r} ({exc})") from None
    except Exception as exc:
        raise ValueError(f"agent {spec_text!r}: importing module {mod!r} failed: {exc}") from None


def get(name: str) -> type:
    """The agent class for a built-in ``name`` or a ``"module:Class"`` import path.

    Raises a one-line ValueError for an unknown name or a path that does not resolve to a class
    with the agent interface (``run`` / ``run_episode``).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"agent name must be a non-empty string, got {name!r}")
    spec_text = name
    if name in BUILTIN:
        name = BUILTIN[name]
    elif ":" not in name:
        raise ValueError(
            f"unknown agent {name!r}; built-ins: {', '.join(BUILTIN)}; or give an import path "
            "'module:Class' (or 'file.py:Class')"
        )
    mod, _, attr = name.rpartition(":")
    if not mod or not attr:
        raise ValueError(f"agent {spec_text!r}: import path must look like 'module:Class'")
    module = _import_module(mod, spec_text)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"agent {spec_text!r}: module {mod!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, type):
        raise ValueError(f"agent {spec_text!r}: {attr!r} is not a class")
    if not (issubclass(obj, Agent) or callable(getattr(obj, "run_episode", None))):
        raise ValueError(
            f"agent {spec_text!r}: class {obj.__name__} has neither the Agent interface "
            "(subclass arq_gym.agents.Agent) nor a run_episode() method"
        )
    return obj


def make(name: str, env: gym.Env, seed: int = 0, **hparams: Any) -> Agent:
    """Build agent ``name`` (see :func:`get`) on ``env``; duck-typed user classes are wrapped
    in :class:`ExternalAgent`. Raises ValueError when the agent cannot drive the env's action
    space (e.g. a Box-action agent on a Discrete env) or rejects a hyperparameter."""
    cls = get(name)
    if issubclass(cls, Agent):
        check_action_space(name, env, cls.action_spaces)
        return cls(env, seed=seed, **hparams)
    allowed = getattr(cls, "action_spaces", None)
    if allowed:
        check_action_space(name, env, tuple(allowed))
    try:
        inner = cls(env, seed=seed, **hparams)
    except TypeError as exc:
        raise ValueError(f"agent {name!r}: {exc}") from None
    return ExternalAgent(inner, env, seed)
