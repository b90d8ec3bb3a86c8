"""``arq-gym finetune``: quantization-aware fine-tuning of the network a policy defines
(a thin wrapper over :func:`arq_gym.finetune.finetune`)."""

from __future__ import annotations

import argparse

from arq_gym.cli import CLIError, command
from arq_gym.cli.commands.certify import add_model_arguments


def _add_finetune(p: argparse.ArgumentParser) -> None:
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--policy", default=None, help="arq-policy/1 JSON file (e.g. a search's "
                      "best_policy.json)")  # fmt: skip
    what.add_argument("--uniform", type=int, default=None, metavar="BITS",
                      help="uniform weight/activation bits (first and last layers at 8)")  # fmt: skip
    add_model_arguments(p, "fine-tune this base checkpoint instead of a shipped one")
    p.add_argument("--epochs", type=int, required=True, help="training epochs")
    p.add_argument("--out", required=True, help="output folder (model.pt, policy.json, ...)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--lr", type=float, default=0.01, help="initial learning rate (cosine to 0)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-images", type=int, default=2000,
                   help="held-out validation images for model selection (default 2,000)")  # fmt: skip
    p.add_argument("--train-images", type=int, default=None,
                   help="use only K evenly spaced training images (quick runs)")  # fmt: skip
    p.add_argument("--distill", type=float, default=0.0, metavar="W",
                   help="weight in [0, 1] of knowledge distillation from the FP32 network on "
                        "the same noisy images (default 0: cross-entropy only)")  # fmt: skip
    add_recipe_arguments(p)
    p.add_argument("--no-bf16", action="store_true", help="no bf16 autocast (plain fp32)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_recipe_arguments(p: argparse.ArgumentParser) -> None:
    """The noise-training recipe options (default: the base model's own training recipe)."""
    p.add_argument("--consistency", type=float, default=None, metavar="LAMBDA",
                   help="consistency regulariser across noisy copies (Jeong and Shin 2020); "
                        "default: the base model's own recipe, 0 (plain Gaussian noise) for a "
                        "model trained without it")  # fmt: skip
    p.add_argument("--noise-copies", type=int, default=None, metavar="M",
                   help="noisy copies of each image with --consistency (default: the base "
                        "model's, else 2)")  # fmt: skip
    p.add_argument("--consistency-eta", type=float, default=None, metavar="ETA",
                   help="weight of the mean prediction's entropy (default: the base model's, "
                        "else 0.5)")  # fmt: skip


def recipe_kwargs(args) -> dict:
    """The recipe options of ``args`` as config fields."""
    return {"consistency": args.consistency, "noise_copies": args.noise_copies,
            "consistency_eta": args.consistency_eta}  # fmt: skip


def resolve_policy(policy_file: str | None, uniform: int | None, layers) -> tuple:
    """The policy of ``--policy FILE`` or ``--uniform B`` for ``layers``, and a description."""
    from arq_gym.policy import Policy, PolicyError, load_policy

    try:
        if policy_file:
            policy, _doc = load_policy(policy_file, layers)
            return policy, f"policy {policy_file}"
        keep = None if uniform == 32 else 8
        policy = Policy.uniform(len(layers), uniform, keep_first_last=keep)
        policy.check(layers)
    except PolicyError as exc:
        raise CLIError(str(exc)) from exc
    return policy, f"uniform W{uniform}A{uniform}"


@command("finetune", "quantization-aware fine-tuning of a policy's network under Gaussian "
                     "noise (writes a quantized checkpoint; resumable)")(_add_finetune)  # fmt: skip
def cmd_finetune(args) -> dict:
    import torch

    from arq_gym.cli.commands.certify import _load_model
    from arq_gym.data import DataError, load
    from arq_gym.finetune import FinetuneConfig, finetune
    from arq_gym.quant import find_layers

    model, meta = _load_model(args)
    try:
        splits = load(meta["dataset"], args.data_dir)
    except DataError as exc:
        raise CLIError(str(exc)) from exc
    sample = torch.from_numpy(splits.val.x[:1]).float() / 255.0
    policy, what = resolve_policy(args.policy, args.uniform, find_layers(model, sample))
    cfg = FinetuneConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         weight_decay=args.weight_decay, seed=args.seed, distill=args.distill,
                         bf16=not args.no_bf16, val_images=args.val_images,
                         train_images=args.train_images, device=args.device,
                         **recipe_kwargs(args))  # fmt: skip
    summary = finetune(model, meta, policy, args.out, cfg, splits=splits, resume=args.resume,
                       progress=not args.quiet, policy_source=what)  # fmt: skip
    return {k: v for k, v in summary.items() if k != "history"} | {"out": args.out}
