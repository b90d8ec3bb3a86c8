"""rl-zoo3 hyperparameters for the registered ids, one YAML file per algorithm.

Every file has an entry for each id of :data:`arq_gym.envs.ENV_SPECS` with a fixed model (not
ARQ-Custom-v0, whose episodes are as long as the user's network; copy an entry and size it),
sized in episodes of that env (ResNet-20: 20 steps, LeNet-5: 5 steps, the reward on the last
one): ``n_timesteps``
is a search of 300 episodes, off-policy agents explore randomly for 20 episodes, keep 128 in
the replay buffer and train once per episode; PPO updates every 4 episodes, A2C every episode;
``gamma`` is 1 (an episode is one candidate policy, its reward undiscounted). The values match
``arq-gym search --agent sb3-*`` (:func:`arq_gym.agents.sb3.defaults`) where they overlap.

Use them with rl-zoo3's ``--conf-file``::

    python -m rl_zoo3.train --algo td3 --env ARQ-ResNet20-v0 --gym-packages arq_gym \\
        --conf-file "$(python -m arq_gym.hyperparams td3)"

DQN needs discrete actions: its entries set ``env_kwargs: {action_type: discrete}``, and
rl-zoo3 replaces (does not merge) a file's ``env_kwargs`` with ``--env-kwargs``, so add
``action_type:"'discrete'"`` to your own ``--env-kwargs``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["ALGOS", "path"]

#: algorithms with a shipped file (rl-zoo3's ``--algo`` names)
ALGOS = ("a2c", "dqn", "ppo", "sac", "td3")


def path(algo: str) -> Path:
    """The YAML file of rl-zoo3 hyperparameters for ``algo`` (e.g. ``"td3"``).

    Raises a one-line ValueError for an algorithm without a shipped file.
    """
    name = str(algo).lower()
    if name not in ALGOS:
        raise ValueError(f"no rl-zoo3 hyperparameters for {algo!r}; shipped: {', '.join(ALGOS)}")
    return Path(__file__).resolve().with_name(f"{name}.yml")
