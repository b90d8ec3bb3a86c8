"""Search bit-widths of ResNet-20 with a Stable-Baselines3 agent (DDPG, TD3, SAC or PPO).

    python examples/sb3_search.py --algo ddpg        # fidelity "smoke", 10 episodes: under 2 minutes
    python examples/sb3_search.py --algo ppo --real  # fidelity "search", 300 episodes (hours on CPU)

Plain SB3: the environment is an ordinary Gymnasium env, so the agents are built and trained as
for any other task. Only the settings differ from SB3's defaults, because an episode is one step
per layer with a single reward at its end:

- every agent: ``gamma = 1`` (discounting would only shrink the signal reaching early layers);
- DDPG / TD3 (the agent of HAQ and ARQ): the first episodes are random warm-up, a replay buffer of
  128 episodes, Gaussian exploration noise of std 0.5 (SB3 adds none by default), 300-300 MLPs;
- SAC: its entropy bonus explores without a noise schedule;
- PPO: a rollout of a few whole episodes and GAE lambda 1, so that every step of an episode is
  credited with its final reward.

Prints each episode and the best policy found. ``arq-gym search --agent sb3-td3`` runs the same
agents with resumable checkpoints, TensorBoard logs and the package's tuned defaults.
"""

from __future__ import annotations

import argparse

import gymnasium as gym
import numpy as np
from stable_baselines3 import DDPG, PPO, SAC, TD3
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.noise import NormalActionNoise

import arq_gym  # noqa: F401  (registers the environments)


def make_agent(algo: str, env: gym.Env, episodes: int, seed: int):
    """An SB3 model for ``algo`` with settings for one-reward-per-episode searches."""
    layers = env.unwrapped.num_layers
    common = {"gamma": 1.0, "seed": seed, "device": "cpu"}
    if algo == "ppo":
        per_rollout = 5  # episodes per PPO update
        return PPO("MlpPolicy", env, n_steps=per_rollout * layers, batch_size=layers,
                   n_epochs=10, gae_lambda=1.0, learning_rate=3e-4, **common)  # fmt: skip
    off_policy = {"batch_size": 64, "buffer_size": 128 * layers,
                  "learning_starts": min(20, episodes // 2) * layers}  # fmt: skip
    if algo == "sac":
        return SAC("MlpPolicy", env, **off_policy, **common)
    n_act = env.action_space.shape[0]  # 2 with separate weight and activation bits
    noise = NormalActionNoise(np.zeros(n_act), 0.5 * np.ones(n_act))
    cls = {"ddpg": DDPG, "td3": TD3}[algo]
    return cls("MlpPolicy", env, learning_rate=1e-4, tau=0.01, action_noise=noise,
               policy_kwargs={"net_arch": [300, 300]}, **off_policy, **common)  # fmt: skip


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
    parser.add_argument("--algo", choices=("ddpg", "td3", "sac", "ppo"), default="ddpg")
    parser.add_argument("--real", action="store_true", help="fidelity search, 300 episodes")
    parser.add_argument("--episodes", type=int, default=None)
    parser.add_argument("--env", default="ARQ-ResNet20-v0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    episodes = args.episodes or (300 if args.real else 10)
    fidelity = "search" if args.real else "smoke"

    env = gym.make(args.env, fidelity=fidelity, device=args.device)
    model = make_agent(args.algo, env, episodes, args.seed)
    callback = BestEpisode()
    model.learn(total_timesteps=episodes * env.unwrapped.num_layers, callback=callback)

    info = callback.best_info
    print(f"\nbest reward ({info['reward_name']}) {callback.best_reward:.4f} "
          f"(FP32 ACR {info['fp_acr']:.4f}) after {callback.episodes} episodes")  # fmt: skip
    print(f"W bits {info['w_bits']}\nA bits {info['a_bits']}")
    print(f"BOPs {info['bops_fraction']:.4%} of FP32, budget {info['budget']:.4%}")


if __name__ == "__main__":
    main()
