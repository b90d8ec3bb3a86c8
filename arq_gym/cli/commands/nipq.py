"""``arq-gym nipq``: the NIPQ baseline, bit-widths learned under a BOPs target (a thin wrapper
over :func:`arq_gym.nipq.nipq`)."""

from __future__ import annotations

import argparse

from arq_gym.cli import CLIError, command
from arq_gym.cli.commands.certify import add_model_arguments
from arq_gym.cli.commands.finetune import add_recipe_arguments, recipe_kwargs


def _add_nipq(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, "start from this base checkpoint instead of a shipped one")
    p.add_argument("--budget", default="1/64", help="BOPs target as a fraction of FP32 "
                   "(default 1/64, the cost of uniform W4A4)")  # fmt: skip
    p.add_argument("--epochs", type=int, required=True, help="noise-training epochs (phase 1)")
    p.add_argument("--hard-epochs", type=int, default=3,
                   help="hard-quantization epochs with frozen bits (phase 2, default 3)")  # fmt: skip
    p.add_argument("--keep-first-last", default="auto", metavar="BITS|None",
                   help="bits of the first and last layers, or None to learn them too (default: "
                        "the model's environment default: 8 for ResNets, None for LeNet-5)")  # fmt: skip
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--penalty", type=float, default=1.0,
                   help="weight of the smooth-L1 BOPs term (BOPs / target vs 1)")  # fmt: skip
    p.add_argument("--lr", type=float, default=0.01, help="learning rate of the weights")
    p.add_argument("--bits-lr", type=float, default=0.1,
                   help="learning rate of the bit and range parameters")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-images", type=int, default=2000)
    p.add_argument("--train-images", type=int, default=None,
                   help="use only K evenly spaced training images (quick runs)")  # fmt: skip
    add_recipe_arguments(p)
    p.add_argument("--no-bf16", action="store_true", help="no bf16 autocast (plain fp32)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _keep_first_last(text: str, meta: dict) -> int | None:
    """``--keep-first-last``: an integer, None, or the default of the model's environment."""
    from arq_gym.envs import ENV_SPECS

    if text == "auto":
        for spec in ENV_SPECS.values():
            if spec["model"] == meta.get("architecture"):
                return spec["keep_first_last"]
        return 8
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise CLIError(f"--keep-first-last must be bits (2-8, 32) or None, got {text!r}") from None


@command("nipq", "NIPQ baseline: learn every layer's weight and activation bits under a BOPs "
                 "target, then fine-tune with the bits frozen (resumable)")(_add_nipq)  # fmt: skip
def cmd_nipq(args) -> dict:
    from arq_gym.budget import parse_budget
    from arq_gym.cli.commands.certify import _load_model
    from arq_gym.data import DataError, load
    from arq_gym.nipq import NIPQConfig, nipq

    budget = parse_budget(args.budget)
    model, meta = _load_model(args)
    if meta.get("quantization"):
        raise CLIError("--checkpoint is a quantized checkpoint; NIPQ starts from a base model")
    try:
        splits = load(meta["dataset"], args.data_dir)
    except DataError as exc:
        raise CLIError(str(exc)) from exc
    cfg = NIPQConfig(keep_first_last=_keep_first_last(args.keep_first_last, meta), epochs=args.epochs, hard_epochs=args.hard_epochs, budget=budget,
                     penalty=args.penalty, batch_size=args.batch_size, lr=args.lr,
                     bits_lr=args.bits_lr, seed=args.seed, bf16=not args.no_bf16,
                     val_images=args.val_images, train_images=args.train_images,
                     device=args.device, **recipe_kwargs(args))  # fmt: skip
    summary = nipq(model, meta, args.out, cfg, splits=splits, resume=args.resume,
                   progress=not args.quiet)  # fmt: skip
    return {k: v for k, v in summary.items() if k != "history"} | {"out": args.out}
