"""``arq-gym pareto``: one search per budget and every point certified alike (a thin wrapper
over :func:`arq_gym.experiments.pareto.pareto`)."""

from __future__ import annotations

import argparse

from arq_gym.cli import CLIError, command
from arq_gym.cli.commands.search import _AGENT_HELP, add_backend_arguments


def _add_pareto(p: argparse.ArgumentParser) -> None:
    p.add_argument("--env", default="ARQ-ResNet20-v0", help="env id (default ARQ-ResNet20-v0)")
    p.add_argument("--agent", default="arq-ddpg", help=_AGENT_HELP)
    p.add_argument("--budgets", default="1/16,1/32,1/64,1/128",
                   help="comma-separated BOPs budgets, fractions of FP32 (default "
                        "1/16,1/32,1/64,1/128)")  # fmt: skip
    p.add_argument("--episodes", type=int, required=True, help="episodes per search")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--env-kwargs", nargs="*", default=[], metavar="K=V",
                   help="gym.make keyword arguments for every search (not budget or reward)")
    p.add_argument("--agent-kwargs", nargs="*", default=[], metavar="K=V")
    p.add_argument("--uniform-bits", default="8,6,5,4,3",
                   help="uniform policies certified beside the searches (default 8,6,5,4,3)")
    p.add_argument("--images", type=int, default=500, help="test images (default 500)")
    p.add_argument("--n", type=int, default=10_000, help="noise samples per image")
    p.add_argument("--n0", type=int, default=100)
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--chunk", type=int, default=25, help="images certified between checkpoints")
    add_backend_arguments(p)
    p.add_argument("--resume", action="store_true", help="finish the front in --out")
    p.add_argument("--no-progress", action="store_true")


@command("pareto", "certified robustness against BOPs: one search per budget, every best "
                   "policy, the uniform policies and FP32 certified alike (resumable)")(_add_pareto)  # fmt: skip
def cmd_pareto(args) -> dict:
    import shlex

    from arq_gym.experiments.pareto import pareto
    from arq_gym.experiments.search import parse_kwargs

    try:
        uniform = [int(b) for b in args.uniform_bits.split(",") if b.strip()]
    except ValueError:
        raise CLIError(f"--uniform-bits must be integers, got {args.uniform_bits!r}") from None
    command = "arq-gym " + shlex.join(a for a in getattr(args, "argv", []) if a != "--resume")
    return pareto(
        args.env, args.agent, [b for b in args.budgets.split(",") if b.strip()], args.episodes,
        args.out, seed=args.seed, env_kwargs=parse_kwargs(args.env_kwargs, "env-kwargs"),
        agent_kwargs=parse_kwargs(args.agent_kwargs, "agent-kwargs"), uniform_bits=uniform,
        images=args.images, n=args.n, n0=args.n0, alpha=args.alpha, chunk=args.chunk,
        workers=args.workers, resume=args.resume, progress=not args.no_progress,
        command=command, backend=args.backend, ray_address=args.ray_address,
    )  # fmt: skip
