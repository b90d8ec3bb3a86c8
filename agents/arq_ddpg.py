"""The paper's agent: DDPG as in HAQ (Wang et al., CVPR 2019), used by ARQ.

One episode quantizes the whole network layer by layer; the reward arrives only at the end.
What makes it HAQ's DDPG rather than textbook DDPG (background.md, section 3):

* **Warm-up**: the first ``warmup_episodes`` episodes take uniformly random actions and only
  fill the replay buffer.
* **Exploration**: after warm-up, the action is drawn from a normal distribution centred on the
  actor's output and truncated to the action interval; its standard deviation starts at
  ``noise_std`` and is multiplied by ``noise_decay`` every episode.
* **Sparse reward spread over the episode**: every transition of an episode is stored with the
  episode's final reward.
* **Moving-average baseline**: before each critic update the minibatch rewards have a moving
  average of the minibatch mean rewards (factor ``baseline_alpha``) subtracted.
* **Updates after the episode**: after each post-warm-up episode, as many updates as the episode
  had steps (HAQ updates once per stored transition).

As in HAQ's code, the critic's target is ``r - baseline + discount * (1 - done) * Q'(s', mu'(s'))``
with discount 1, so with the final reward on every transition the critic of step ``t`` learns
about ``(L - t) * (R - baseline)``: a per-step scale that does not change which action is better.

Actions live in the env's ``[-1, 1]`` Box (HAQ works in ``[0, 1]``; the actor ends in tanh
instead of a sigmoid, and HAQ's noise std 0.5 in [0, 1] units is 1.0 here).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from scipy.stats import truncnorm
from torch import nn

from .base import Agent, Transition, episode_length, torch_threads

__all__ = ["ARQDDPG", "DDPGConfig"]


@dataclass
class DDPGConfig:
    """Hyperparameters of :class:`ARQDDPG`; defaults are HAQ's published ones.

    Attributes:
        hidden: units in each of the two hidden layers of actor and critic (HAQ: 300).
        actor_lr: Adam learning rate of the actor (HAQ: 1e-4).
        critic_lr: Adam learning rate of the critic (HAQ: 1e-3).
        tau: soft target-update rate (HAQ: 0.01).
        discount: discount factor (HAQ: 1.0; the episode is a short finite horizon).
        batch_size: minibatch size (HAQ: 64).
        buffer_per_layer: replay buffer size per layer; the buffer holds
            ``buffer_per_layer * episode length`` transitions (HAQ: 128).
        warmup_episodes: episodes of uniformly random actions before learning (HAQ's public
            code: 20; the paper: 100).
        noise_std: initial std of the truncated-normal exploration, in the env's [-1, 1] action
            units (HAQ: 0.5 on [0, 1], i.e. 1.0 here).
        noise_decay: per-episode decay of the exploration std after warm-up (HAQ: 0.99).
        baseline_alpha: moving-average factor of the reward baseline (HAQ: 0.5).
        updates_per_episode: gradient updates after each post-warm-up episode; ``None`` = the
            number of steps of the episode (HAQ).
        init_w: the actor's and critic's output layers start uniform in ``[-init_w, init_w]``.
        device: torch device of the networks ("cpu" is plenty for 300-unit MLPs).
    """

    hidden: int = 300
    actor_lr: float = 1e-4
    critic_lr: float = 1e-3
    tau: float = 0.01
    discount: float = 1.0
    batch_size: int = 64
    buffer_per_layer: int = 128
    warmup_episodes: int = 20
    noise_std: float = 1.0
    noise_decay: float = 0.99
    baseline_alpha: float = 0.5
    updates_per_episode: int | None = None
    init_w: float = 3e-3
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("hidden", "batch_size", "buffer_per_layer"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"arq-ddpg: {name} must be >= 1, got {getattr(self, name)!r}")
        if self.warmup_episodes < 0:
            raise ValueError(f"arq-ddpg: warmup_episodes must be >= 0, got {self.warmup_episodes}")
        for name in ("actor_lr", "critic_lr", "tau", "noise_decay"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"arq-ddpg: {name} must be > 0, got {v!r}")
        if not (0 <= self.discount <= 1 and 0 < self.baseline_alpha <= 1 and self.noise_std >= 0):
            raise ValueError(
                "arq-ddpg: need 0 <= discount <= 1, 0 < baseline_alpha <= 1, noise_std >= 0"
            )


class _Actor(nn.Module):
    def __init__(self, n_obs: int, n_act: int, hidden: int, init_w: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(n_obs, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, n_act), nn.Tanh(),
        )  # fmt: skip
        nn.init.uniform_(self.net[4].weight, -init_w, init_w)
        nn.init.uniform_(self.net[4].bias, -init_w, init_w)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)


class _Critic(nn.Module):
    """HAQ's critic: state and action embedded separately, summed, then two layers."""

    def __init__(self, n_obs: int, n_act: int, hidden: int, init_w: float) -> None:
        super().__init__()
        self.fc_obs = nn.Linear(n_obs, hidden)
        self.fc_act = nn.Linear(n_act, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 1)
        nn.init.uniform_(self.out.weight, -init_w, init_w)
        nn.init.uniform_(self.out.bias, -init_w, init_w)

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc_obs(obs) + self.fc_act(act))
        return self.out(torch.relu(self.fc2(h))).squeeze(-1)


class _Replay:
    """Ring buffer of (obs, action, reward, next_obs, done) as numpy arrays."""

    def __init__(self, capacity: int, n_obs: int, n_act: int) -> None:
        self.capacity = capacity
        self.obs = np.zeros((capacity, n_obs), np.float32)
        self.act = np.zeros((capacity, n_act), np.float32)
        self.rew = np.zeros(capacity, np.float32)
        self.next_obs = np.zeros((capacity, n_obs), np.float32)
        self.done = np.zeros(capacity, np.float32)
        self.pos = 0
        self.size = 0

    def add(self, obs, act, rew, next_obs, done) -> None:
        i = self.pos
        self.obs[i], self.act[i], self.rew[i] = obs, act, rew
        self.next_obs[i], self.done[i] = next_obs, float(done)
        self.pos = (self.pos + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, rng: np.random.Generator, batch: int) -> tuple[np.ndarray, ...]:
        idx = rng.integers(0, self.size, size=batch)
        return (
            self.obs[idx],
            self.act[idx],
            self.rew[idx].copy(),
            self.next_obs[idx],
            self.done[idx],
        )


class ARQDDPG(Agent):
    """The paper's DDPG agent (HAQ-style); hyperparameters: the fields of :class:`DDPGConfig`.

    Needs a Box action space (the arq-gym envs with ``action_type="continuous"``).
    """

    name = "arq-ddpg"
    action_spaces = (spaces.Box,)

    def __init__(self, env: gym.Env, seed: int = 0, **hparams: Any) -> None:
        known = {f.name for f in fields(DDPGConfig)}
        unknown = sorted(set(hparams) - known)
        if unknown:
            raise ValueError(
                f"agent 'arq-ddpg' got unknown hyperparameter(s): {', '.join(unknown)}"
                f"; known: {', '.join(sorted(known))}"
            )
        super().__init__(env, seed)
        self.cfg = DDPGConfig(**hparams)
        space = env.action_space
        if not (np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high))):
            raise ValueError(f"agent 'arq-ddpg' needs a bounded Box action space, got {space}")
        self.low = space.low.astype(np.float64).reshape(-1)
        self.high = space.high.astype(np.float64).reshape(-1)
        n_obs = int(np.prod(env.observation_space.shape))
        n_act = int(np.prod(space.shape))
        self.device = torch.device(self.cfg.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.actor = _Actor(n_obs, n_act, self.cfg.hidden, self.cfg.init_w).to(self.device)
            self.critic = _Critic(n_obs, n_act, self.cfg.hidden, self.cfg.init_w).to(self.device)
        self.actor_target = copy.deepcopy(self.actor)
        self.critic_target = copy.deepcopy(self.critic)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=self.cfg.actor_lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=self.cfg.critic_lr)
        self.buffer = _Replay(self.cfg.buffer_per_layer * episode_length(env), n_obs, n_act)
        self.baseline: float | None = None
        self.noise = self.cfg.noise_std
        self.last_losses = (float("nan"), float("nan"))
        self._episode: list[Transition] = []

    # ------------------------------------------------------------------ acting

    def _to_env(self, a_unit: np.ndarray) -> np.ndarray:
        """Actor output in [-1, 1] -> the env's Box interval."""
        return (self.low + (a_unit + 1.0) * 0.5 * (self.high - self.low)).astype(np.float32)

    def _from_env(self, action: np.ndarray) -> np.ndarray:
        a = np.asarray(action, np.float64).reshape(-1)
        return (2.0 * (a - self.low) / (self.high - self.low) - 1.0).astype(np.float32)

    def exploration_std(self) -> float:
        """Std of the exploration noise for the next episode ([-1, 1] units)."""
        k = max(self.episodes_done - self.cfg.warmup_episodes, 0)
        return self.cfg.noise_std * self.cfg.noise_decay**k

    def act(self, obs: np.ndarray, explore: bool = True) -> np.ndarray:
        shape = self.env.action_space.shape
        if explore and self.episodes_done < self.cfg.warmup_episodes:
            a = self.rng.uniform(-1.0, 1.0, size=self.low.shape)
            return self._to_env(a).reshape(shape)
        with torch.no_grad(), torch_threads(1):
            o = torch.as_tensor(np.asarray(obs, np.float32).reshape(1, -1), device=self.device)
            mu = self.actor(o).cpu().numpy().astype(np.float64).reshape(-1)
        if explore:
            std = self.exploration_std()
            self.noise = std
            if std > 0:
                a_lo, a_hi = (-1.0 - mu) / std, (1.0 - mu) / std
                mu = truncnorm.rvs(a_lo, a_hi, loc=mu, scale=std, random_state=self.rng)
        return self._to_env(np.clip(mu, -1.0, 1.0)).reshape(shape)

    # ------------------------------------------------------------------ learning

    def observe(self, transition: Transition) -> None:
        self._episode.append(transition)

    def end_episode(self, reward: float, info: dict) -> None:
        steps = self._episode
        self._episode = []
        final = float(steps[-1].reward) if steps else float(reward)
        for t in steps:
            self.buffer.add(
                np.asarray(t.obs, np.float32).reshape(-1),
                self._from_env(t.action),
                final,
                np.asarray(t.next_obs, np.float32).reshape(-1),
                t.terminated,
            )
        if self.episodes_done >= self.cfg.warmup_episodes and self.buffer.size > 0:
            n = self.cfg.updates_per_episode
            with torch_threads(1):
                for _ in range(len(steps) if n is None else int(n)):
                    self._update()
        super().end_episode(reward, info)

    def _update(self) -> None:
        obs, act, rew, next_obs, done = self.buffer.sample(self.rng, self.cfg.batch_size)
        mean = float(np.mean(rew))
        if self.baseline is None:
            self.baseline = mean
        else:
            self.baseline += self.cfg.baseline_alpha * (mean - self.baseline)
        rew = rew - self.baseline
        t = lambda x: torch.as_tensor(x, device=self.device)  # noqa: E731
        obs_t, act_t, next_t = t(obs), t(act), t(next_obs)
        with torch.no_grad():
            q_next = self.critic_target(next_t, self.actor_target(next_t))
            target = t(rew) + self.cfg.discount * (1.0 - t(done)) * q_next
        critic_loss = nn.functional.mse_loss(self.critic(obs_t, act_t), target)
        self.critic_opt.zero_grad()
        critic_loss.backward()
        self.critic_opt.step()
        actor_loss = -self.critic(obs_t, self.actor(obs_t)).mean()
        self.actor_opt.zero_grad()
        actor_loss.backward()
        self.actor_opt.step()
        with torch.no_grad():
            for tgt, src in ((self.actor_target, self.actor), (self.critic_target, self.critic)):
                for p_t, p in zip(tgt.parameters(), src.parameters()):
                    p_t.mul_(1.0 - self.cfg.tau).add_(p, alpha=self.cfg.tau)
        self.last_losses = (float(critic_loss.detach()), float(actor_loss.detach()))

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        cpu = lambda sd: {k: v.detach().cpu().clone() for k, v in sd.items()}  # noqa: E731
        state.update(
            config=asdict(self.cfg),
            actor=cpu(self.actor.state_dict()),
            critic=cpu(self.critic.state_dict()),
            actor_target=cpu(self.actor_target.state_dict()),
            critic_target=cpu(self.critic_target.state_dict()),
            actor_opt=copy.deepcopy(self.actor_opt.state_dict()),
            critic_opt=copy.deepcopy(self.critic_opt.state_dict()),
            buffer=copy.deepcopy(vars(self.buffer)),
            baseline=self.baseline,
            noise=self.noise,
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.actor_target.load_state_dict(state["actor_target"])
        self.critic_target.load_state_dict(state["critic_target"])
        self.actor_opt.load_state_dict(state["actor_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        vars(self.buffer).update(copy.deepcopy(state["buffer"]))
        self.baseline = state["baseline"]
        self.noise = state["noise"]
