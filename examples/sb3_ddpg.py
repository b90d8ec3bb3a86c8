"""Search bit-widths of ResNet-20 with Stable-Baselines3 DDPG (the agent of HAQ and ARQ).

    python examples/sb3_ddpg.py                 # fidelity "smoke", 10 episodes: under 2 minutes
    python examples/sb3_ddpg.py --real          # fidelity "search", 300 episodes (hours on CPU)

The reward comes only at the end of an episode (one step per layer), so the discount is 1
and the first episodes are random warm-up, as in HAQ. Prints the best policy found.
"""

from __future__ import annotations

import argparse

import gymnasium as gym
import numpy as np
from stable_baselines3 import DDPG
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.noise import NormalActionNoise

import arq_gym  # noqa: F401  (registers the environments)


class BestEpisode(BaseCallback):
    """Keeps the terminal info of the best episode seen while learning."""

    def __init__(self) -> None:
        super().__init__()
        self.best_reward, self.best_info, self.episodes = -np.inf, None, 0

    def _on_step(self) -> bool:
        for done, info, reward in zip(self.locals["dones"], self.locals["infos"],
                                      self.locals["rewards"]):  # fmt: skip
            if done:
                self.episodes += 1
                if reward > self.best_reward:
                    self.best_reward, self.best_info = float(reward), info
                print(f"episode {self.episodes}: reward {reward:.4f}, "
                      f"BOPs {info['bops_fraction']:.3%}")  # fmt: skip
        return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help="fidelity search, 300 episodes")
    parser.add_argument("--episodes", type=int, default=None)
    parser.add_argument("--env", default="ARQ-ResNet20-v0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    episodes = args.episodes or (300 if args.real else 10)
    fidelity = "search" if args.real else "smoke"

    env = gym.make(args.env, fidelity=fidelity, device=args.device)
    layers = env.unwrapped.num_layers
    n_act = env.action_space.shape[0]  # 2: weight and activation bits (bits_mode="wa")
    model = DDPG(
        "MlpPolicy", env, learning_rate=1e-4, gamma=1.0, tau=0.01, batch_size=64,
        buffer_size=128 * layers, learning_starts=min(20, episodes // 2) * layers,
        action_noise=NormalActionNoise(np.zeros(n_act), 0.5 * np.ones(n_act)),
        policy_kwargs={"net_arch": [300, 300]}, seed=args.seed, device="cpu",
    )  # fmt: skip
    callback = BestEpisode()
    model.learn(total_timesteps=episodes * layers, callback=callback)

    info = callback.best_info
    print(f"\nbest reward ({info['reward_name']}) {callback.best_reward:.4f} "
          f"(FP32 ACR {info['fp_acr']:.4f}) after {callback.episodes} episodes")  # fmt: skip
    print(f"W bits {info['w_bits']}\nA bits {info['a_bits']}")
    print(f"BOPs {info['bops_fraction']:.4%} of FP32, budget {info['budget']:.4%}")


if __name__ == "__main__":
    main()
