"""``arq-gym table``: the paper-style results table (a thin wrapper over
:func:`arq_gym.experiments.table.results_table`)."""

from __future__ import annotations

import argparse

from arq_gym.cli import command
from arq_gym.cli.commands.search import add_backend_arguments


def _add_table(p: argparse.ArgumentParser) -> None:
    p.add_argument("--env", default="ARQ-ResNet20-v0", help="env id (default ARQ-ResNet20-v0)")
    p.add_argument("--out", required=True, help="output folder, e.g. results/resnet20_cifar10_s0.25")
    p.add_argument(
        "--rows",
        default="fp32,w8a8,w4a4,haq,arq,random",
        help="comma-separated rows: fp32, w8a8, w4a4, haq (arq-ddpg, reward clean_accuracy), "
        "arq (arq-ddpg, reward acr), random, nipq (needs --finetune-epochs), or any agent name "
        "(an ACR search by it)",
    )
    p.add_argument("--episodes", type=int, default=200, help="episodes per search (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of every search")
    p.add_argument("--env-kwargs", nargs="*", default=[], metavar="K=V",
                   help="gym.make keyword arguments for every row, e.g. sigma=0.5 fidelity=search")  # fmt: skip
    p.add_argument("--agent-kwargs", nargs="*", default=[], metavar="K=V",
                   help="agent hyperparameters for every search")  # fmt: skip
    p.add_argument("--images", type=int, default=500, help="test images (default 500, every 20th)")
    p.add_argument("--n", type=int, default=10_000, help="noise samples per image (default 10,000)")
    p.add_argument("--n0", type=int, default=100, help="selection samples (default 100)")
    p.add_argument("--alpha", type=float, default=0.001, help="failure probability (default 0.001)")
    p.add_argument("--chunk", type=int, default=25, help="images certified between checkpoints")
    p.add_argument("--finetune-epochs", type=int, default=None, metavar="E",
                   help="also fine-tune every quantized row for E epochs (rows <row>+ft) and give "
                        "the nipq row E epochs of training")  # fmt: skip
    p.add_argument("--finetune-kwargs", nargs="*", default=[], metavar="K=V",
                   help="other fine-tuning settings for those rows, e.g. lr=0.005 "
                        "train_images=5000")  # fmt: skip
    add_backend_arguments(p)
    p.add_argument("--resume", action="store_true", help="finish the table in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


@command("table", "the paper-style results table: FP32, uniform and searched policies, "
                  "certified alike on test images (resumable)")(_add_table)  # fmt: skip
def cmd_table(args) -> dict:
    import shlex

    from arq_gym.experiments.search import parse_kwargs
    from arq_gym.experiments.table import results_table

    # the command that (re)makes this table, recorded in it (--resume continues it)
    parts = ["arq-gym", "table", "--env", args.env, "--rows", args.rows, "--episodes",
             args.episodes, "--seed", args.seed, "--images", args.images, "--n", args.n, "--n0",
             args.n0, "--alpha", args.alpha, "--out", args.out]  # fmt: skip
    if args.finetune_epochs is not None:
        parts += ["--finetune-epochs", args.finetune_epochs]
    for flag, items in (("--env-kwargs", args.env_kwargs), ("--agent-kwargs", args.agent_kwargs),
                        ("--finetune-kwargs", args.finetune_kwargs)):  # fmt: skip
        parts += [flag, *items] if items else []
    command = " ".join(shlex.quote(str(p)) for p in parts)
    return results_table(
        args.env, args.out, rows=args.rows, episodes=args.episodes, seed=args.seed,
        env_kwargs=parse_kwargs(args.env_kwargs, "env-kwargs"),
        agent_kwargs=parse_kwargs(args.agent_kwargs, "agent-kwargs"),
        images=args.images, n=args.n, n0=args.n0, alpha=args.alpha, chunk=args.chunk,
        resume=args.resume, progress=not args.no_progress, command=command,
        finetune_epochs=args.finetune_epochs,
        finetune_kwargs=parse_kwargs(args.finetune_kwargs, "finetune-kwargs"),
        workers=args.workers, backend=args.backend, ray_address=args.ray_address,
    )  # fmt: skip
