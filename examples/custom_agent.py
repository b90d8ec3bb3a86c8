"""Your own search algorithm on arq-gym, using nothing but the Gymnasium API.

``GreedyLayerSearch`` is a greedy coordinate search: it keeps the best per-layer action vector
found so far and, episode after episode, tries another value for one layer at a time (cycling
through the layers), keeping the change when the episode's reward improves. Each episode is
one candidate policy, so the search costs one certification per episode, like every agent.

Run it directly (a short search at smoke fidelity)::

    python examples/custom_agent.py --episodes 20

or plug it into ``arq-gym search`` (TensorBoard, CSV, best_policy.json, resume and the final
test-set certification come for free) by naming the class with an import path, either a file
path or a module on ``sys.path``::

    arq-gym search --env ARQ-LeNet5-v0 --env-kwargs fidelity=smoke --episodes 30 \\
        --agent examples/custom_agent.py:GreedyLayerSearch --agent-kwargs candidates=7 \\
        --out runs/greedy

What ``arq-gym search`` needs from a class: ``__init__(env, seed=0, **hyperparameters)`` and
``run_episode() -> (reward, terminal info)``. For ``--resume`` it pickles the object's
attributes (the env excluded); define ``state_dict()`` / ``load_state_dict(state)`` to control
that. Subclass ``arq_gym.agents.Agent`` instead to use the step-level loop protocol (``act``,
``observe``, ``end_episode``).
"""

from __future__ import annotations

import argparse

import gymnasium as gym
import numpy as np


class GreedyLayerSearch:
    """Greedy per-layer coordinate search over the env's Box or Discrete actions.

    Args:
        env: an arq-gym env (one step per layer, the reward on the last step).
        seed: seeds the order in which candidate values are tried.
        candidates: how many evenly spaced action values are tried per layer.
    """

    def __init__(self, env: gym.Env, seed: int = 0, candidates: int = 5) -> None:
        if candidates < 2:
            raise ValueError(f"candidates must be >= 2, got {candidates}")
        self.env = env
        self.rng = np.random.default_rng(seed)
        space = env.action_space
        if isinstance(space, gym.spaces.Discrete):
            self.values = np.unique(np.linspace(0, space.n - 1, candidates).round().astype(int))
        else:
            self.values = np.linspace(float(space.low[0]), float(space.high[0]), candidates)
        self.best_actions: list | None = None  # per layer, learned from the first episode
        self.best_reward = -np.inf
        self.layer = 0  # the layer whose value is being changed
        self.queue: list = []  # values still to try for that layer
        self.seed_reset = seed

    def _action(self, value):
        space = self.env.action_space
        if isinstance(space, gym.spaces.Discrete):
            return int(value)
        return np.full(space.shape, value, dtype=space.dtype)

    def _play(self, actions: list) -> tuple[float, dict, int]:
        obs, _ = self.env.reset(seed=self.seed_reset)
        self.seed_reset = None
        steps, total = 0, 0.0
        while True:
            value = actions[steps] if steps < len(actions) else self.values[len(self.values) // 2]
            obs, reward, terminated, truncated, info = self.env.step(self._action(value))
            total += float(reward)
            steps += 1
            if terminated or truncated:
                return total, info, steps

    def run_episode(self) -> tuple[float, dict]:
        """Evaluate one candidate (the incumbent with one layer changed); return its reward."""
        if self.best_actions is None:  # first episode: every layer at the middle value
            mid = self.values[len(self.values) // 2]
            reward, info, steps = self._play([mid] * 10_000)
            self.best_actions, self.best_reward = [mid] * steps, reward
            return reward, info
        if not self.queue:
            current = self.best_actions[self.layer]
            self.queue = [v for v in self.rng.permutation(self.values) if v != current]
        candidate = list(self.best_actions)
        candidate[self.layer] = self.queue.pop()
        reward, info, _ = self._play(candidate)
        if reward > self.best_reward:
            self.best_actions, self.best_reward = candidate, reward
        if not self.queue:
            self.layer = (self.layer + 1) % len(self.best_actions)
        return reward, info


def main() -> None:
    import arq_gym  # noqa: F401 - registers the ARQ-* envs

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env", default="ARQ-LeNet5-v0")
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--fidelity", default="smoke")
    args = p.parse_args()
    env = gym.make(args.env, fidelity=args.fidelity)
    agent = GreedyLayerSearch(env, seed=0)
    for episode in range(1, args.episodes + 1):
        reward, info = agent.run_episode()
        print(
            f"episode {episode:3d}: reward {reward:.4f}  best {agent.best_reward:.4f}  "
            f"bits {info['w_bits']}  BOPs {100 * info['bops_fraction']:.2f}% of FP32"
        )
    env.close()


if __name__ == "__main__":
    main()
