"""``arq-gym search``: one search of an agent on an env (a thin wrapper over
:func:`arq_gym.experiments.search.search`); also the arguments ``benchmark`` shares."""

from __future__ import annotations

import argparse

from arq_gym.cli import command

_AGENT_HELP = ("arq-ddpg (the paper's), random, sb3-ddpg, sb3-td3, sb3-sac, sb3-ppo, sb3-a2c, "
               "sb3-dqn, optuna-tpe, optuna-cmaes, or a user's agent as 'module:Class' / "
               "'file.py:Class'")  # fmt: skip


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--env", required=True, help="env id, e.g. ARQ-ResNet20-v0 or ARQ-LeNet5-v0")
    p.add_argument("--episodes", type=int, required=True, help="episodes per search")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--env-kwargs", nargs="*", default=[], metavar="K=V",
                   help="gym.make keyword arguments, e.g. fidelity=smoke budget=1/64 "
                        "bits=2,8 keep_first_last=None")  # fmt: skip
    p.add_argument(
        "--agent-kwargs",
        nargs="*",
        default=[],
        metavar="K=V",
        help="agent hyperparameters, e.g. warmup_episodes=10",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last completed episode",
    )
    p.add_argument(
        "--final-eval",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="certify the best policy on test images at the end (default: on)",
    )
    p.add_argument("--final-images", type=int, default=500, help="test images (default 500)")
    p.add_argument("--final-n", type=int, default=10_000, help="noise samples (default 10,000)")
    p.add_argument("--final-n0", type=int, default=100, help="selection samples (default 100)")
    p.add_argument("--final-alpha", type=float, default=0.001, help="failure probability")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_backend_arguments(p: argparse.ArgumentParser, workers: bool = True) -> None:
    """``--backend local|ray``, ``--ray-address`` (and ``--workers``): where searches run
    (:func:`arq_gym.experiments.parallel.run_searches`)."""
    if workers:
        p.add_argument("--workers", type=int, default=1,
                       help="searches side by side on the local backend (default 1)")  # fmt: skip
    p.add_argument("--backend", choices=("local", "ray"), default="local",
                   help="local processes, or one Ray task per search (pip install -e "
                        "\".[ray]\")")  # fmt: skip
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to join, e.g. 'auto' after `ray start --head` (default: "
                        "start a local one)")  # fmt: skip


def _add_search(p: argparse.ArgumentParser) -> None:
    _add_common(p)
    p.add_argument("--agent", default="arq-ddpg", help=_AGENT_HELP)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-tensorboard", action="store_true", help="do not write DIR/tb")
    p.add_argument("--final-chunk", type=int, default=None, metavar="K",
                   help="test images certified between saved checkpoints of the final evaluation "
                        "(default: as many as fit 250,000 forward passes, at most 25)")  # fmt: skip


@command("search", "search mixed-precision policies with an agent (writes CSV, JSON, "
                   "TensorBoard, plots; resumable)")(_add_search)  # fmt: skip
def cmd_search(args) -> dict:
    from arq_gym.experiments.search import parse_kwargs, search

    return search(
        args.env, args.agent, args.episodes, args.seed, args.out,
        env_kwargs=parse_kwargs(args.env_kwargs, "env-kwargs"),
        agent_kwargs=parse_kwargs(args.agent_kwargs, "agent-kwargs"),
        resume=args.resume, final_eval=args.final_eval, final_images=args.final_images,
        final_n=args.final_n, final_n0=args.final_n0, final_alpha=args.final_alpha,
        progress=not args.no_progress, tensorboard=not args.no_tensorboard,
        final_chunk=args.final_chunk,
    )  # fmt: skip
