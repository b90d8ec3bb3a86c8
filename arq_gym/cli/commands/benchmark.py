"""``arq-gym benchmark``: several agents x seeds and a leaderboard (a thin wrapper over
:func:`arq_gym.experiments.benchmark.benchmark`)."""

from __future__ import annotations

import argparse

from arq_gym.cli import command
from arq_gym.cli.commands.search import _AGENT_HELP, _add_common, add_backend_arguments


def _add_benchmark(p: argparse.ArgumentParser) -> None:
    _add_common(p)
    p.add_argument("--agents", required=True, help="comma-separated agents; " + _AGENT_HELP)
    p.epilog = (
        "--agent-kwargs key=value applies to every agent, agent:key=value to one "
        "(e.g. arq-ddpg:warmup_episodes=10)"
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..K-1 per agent (default 3)")
    add_backend_arguments(p)


@command("benchmark", "run several agents x seeds and write a leaderboard (resumable)")(
    _add_benchmark
)
def cmd_benchmark(args) -> dict:
    from arq_gym.experiments.benchmark import benchmark
    from arq_gym.experiments.search import parse_kwargs

    return benchmark(
        args.env, [a.strip() for a in args.agents.split(",") if a.strip()], args.seeds,
        args.episodes, args.out, workers=args.workers,
        env_kwargs=parse_kwargs(args.env_kwargs, "env-kwargs"),
        agent_kwargs=list(args.agent_kwargs),
        resume=args.resume, final_eval=args.final_eval, final_images=args.final_images,
        final_n=args.final_n, final_n0=args.final_n0, final_alpha=args.final_alpha,
        progress=not args.no_progress, backend=args.backend, ray_address=args.ray_address,
    )  # fmt: skip
