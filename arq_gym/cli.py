"""The ``arq-gym`` command line (also ``python -m arq_gym``).

Every command takes ``--json`` to print one machine-readable JSON object as its last line and
exits non-zero with a one-line error on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable]] = {}


class CLIError(Exception):
    """Bad input: printed as one line, exit status 2."""


def command(name: str, help: str):
    """Register ``fn(args) -> dict`` as a subcommand whose arguments ``add`` declares."""

    def wrap(add):
        def deco(fn):
            COMMANDS[name] = (add, fn, help)
            return fn

        return deco

    return wrap


def _emit(args, result: dict, human: Callable[[dict], None] | None = None) -> None:
    if getattr(args, "json", False):
        print(json.dumps(result, default=float))
    elif human is not None:
        human(result)
    else:
        for k, v in result.items():
            print(f"{k}: {v}")


# --------------------------------------------------------------------------- data


def _add_data(p):
    p.add_argument("--data-dir", help="folder holding the datasets (default: ARQ_GYM_DATA, "
                                      "then the user cache folder)")  # fmt: skip
    p.add_argument("--download", action="store_true",
                   help="download what is missing into the user cache folder")  # fmt: skip
    p.add_argument("--dataset", action="append", default=None, metavar="NAME",
                   help="check only this dataset (cifar10, fashion_mnist; repeatable)")  # fmt: skip
    p.epilog = "exits 1 when a dataset asked for (by default: every one) is not found"


@command("data", "find or prepare the datasets and report what was found")(_add_data)
def cmd_data(args) -> dict:
    from arq_gym.data import DataError, describe, user_cache_dir

    if args.data_dir is not None:
        from pathlib import Path

        if not Path(args.data_dir).is_dir():
            raise CLIError(f"data dir {args.data_dir!r} does not exist")
    try:
        found = describe(args.data_dir, download=bool(args.download), names=args.dataset)
    except DataError as exc:
        raise CLIError(str(exc)) from exc
    missing = [d["dataset"] for d in found if "error" in d]
    if missing:  # reported below the listing; the exit status says it to scripts
        args.exit_status = 1
        where = "--data-dir" if args.data_dir else "ARQ_GYM_DATA or the user cache"
        args.exit_message = (
            f"{', '.join(missing)} not found in {where}; set ARQ_GYM_DATA=/path/to/datasets "
            f"or run `arq-gym data --download` (into {user_cache_dir()})"
        )
    return {"datasets": found, "missing": missing}


def _human_data(res: dict) -> None:
    for d in res["datasets"]:
        if "error" in d:
            print(f"{d['dataset']}: not found ({d['error']})")
        else:
            print(f"{d['dataset']}: {d['format']} at {d['source']}: train {d['train']}, "
                  f"val {d['val']}, test {d['test']} (sha256 {d['sha256'][:16]}...)")


# --------------------------------------------------------------------------- envs


@command("envs", "list the registered environment ids and their defaults")(lambda p: None)
def cmd_envs(args) -> dict:
    import inspect

    from arq_gym.envs import ENV_SPECS
    from arq_gym.envs.arq_env import ARQEnv

    defaults = {
        k: v.default
        for k, v in inspect.signature(ARQEnv.__init__).parameters.items()
        if v.default is not inspect.Parameter.empty
    }
    # sigma=None means "the shipped model's default (0.25), or the checkpoint's own sigma"
    defaults["sigma"] = 0.25
    envs = []
    for env_id, spec in ENV_SPECS.items():
        kwargs = {**defaults, **spec}
        envs.append({"id": env_id, "kwargs": kwargs, "fidelity": _fidelity_settings(kwargs)})
    return {"envs": envs}


#: keyword arguments that override a fidelity preset (None: the preset's value)
_FIDELITY_OVERRIDES = ("images", "n", "n_p", "alpha")


def _fidelity_settings(kwargs: dict) -> dict:
    """What an id's fidelity means: its preset with the id's overrides applied."""
    from arq_gym.fidelity import get_fidelity

    fid = get_fidelity(kwargs.get("fidelity", "search"),
                       **{k: kwargs.get(k) for k in _FIDELITY_OVERRIDES})  # fmt: skip
    return {"name": fid.name, "images": fid.images, "split": fid.split, "n0": fid.n0, "n": fid.n,
            "n_p": fid.n_p, "alpha": fid.alpha}  # fmt: skip


def _human_envs(res: dict) -> None:
    for env in res["envs"]:
        kw = env["kwargs"]
        fid = env["fidelity"]
        parts = []
        for k, v in kw.items():
            if k in _FIDELITY_OVERRIDES and v is None:
                continue  # shown resolved, with the fidelity
            if k == "fidelity":
                parts.append(f"fidelity={v!r} (images={fid['images']} {fid['split']}, "
                             f"n0={fid['n0']}, n={fid['n']}, n_p={fid['n_p']}, "
                             f"alpha={fid['alpha']})")  # fmt: skip
            else:
                parts.append(f"{k}={v!r}")
        print(f"{env['id']}: " + ", ".join(parts))


# --------------------------------------------------------------------------- train


def _add_train(p):
    p.add_argument("--model", default="resnet20", help="architecture (resnet20/32/44/56, lenet5)")
    p.add_argument("--dataset", default=None, help="cifar10 or fashion_mnist (default: the model's)")
    p.add_argument("--sigma", type=float, default=0.25, help="Gaussian noise std in [0,1] pixels")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-bf16", action="store_true", help="train in plain fp32")
    p.add_argument("--out", required=True, help="checkpoint path to write")
    p.add_argument("--resume", action="store_true", help="continue from OUT.resume.pt")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--log-dir", default=None, help="TensorBoard folder (default: OUT.tb)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--train-images", type=int, default=None, help="use only K training images")
    p.add_argument("--init", default=None, metavar="CKPT",
                   help="warm start from this checkpoint (same model, dataset, sigma); a fresh "
                        "cosine schedule of --epochs follows")


@command("train", "train a base model with Gaussian noise augmentation")(_add_train)
def cmd_train(args) -> dict:
    from arq_gym.train import TrainConfig, train

    cfg = TrainConfig(model=args.model, dataset=args.dataset, sigma=args.sigma, epochs=args.epochs,
                      batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      bf16=not args.no_bf16, device=args.device,
                      train_images=args.train_images, init=args.init)
    meta = train(cfg, args.out, data_dir=args.data_dir, resume=args.resume,
                 log_dir=args.log_dir or (args.out + ".tb"))
    return {k: v for k, v in meta.items() if k != "history"} | {"out": args.out}


# --------------------------------------------------------------------------- main

_HUMAN = {"data": _human_data, "envs": _human_envs}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arq-gym", description=__doc__.splitlines()[0])
    from arq_gym import __version__

    parser.add_argument("--version", action="version", version=f"arq-gym {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _load_commands()
    for name, (add, _fn, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add(p)
        p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
        p.add_argument("--threads", default=None, metavar="N",
                       help="torch threads per process, workers included (default: "
                            "$ARQ_GYM_THREADS, else one per core; workers get cores // workers)")
    return parser


def _load_commands() -> None:
    """Import modules that register further commands (kept lazy for a fast --help)."""
    import importlib

    for mod in ("arq_gym.cli_certify", "arq_gym.cli_search", "arq_gym.cli_bench",
                "arq_gym.cli_finetune", "arq_gym.cli_nipq"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise


def _apply_threads(args) -> None:
    """Honour ``--threads N`` (exported as ``ARQ_GYM_THREADS`` for the processes the command
    starts) or ``ARQ_GYM_THREADS``; ``args.threads`` becomes the int or None (unset)."""
    from arq_gym.threads import ThreadsError, parse_threads, set_threads, use_configured_threads

    try:
        if args.threads is not None:
            args.threads = set_threads(parse_threads(args.threads, "--threads"), export=True)
        else:
            args.threads = use_configured_threads()
    except ThreadsError as exc:
        raise CLIError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded by long-running commands
    _add, fn, _help = COMMANDS[args.command]
    try:
        _apply_threads(args)
        result = fn(args)
    except (CLIError, ValueError, FileNotFoundError, FileExistsError, RuntimeError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"arq-gym {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"arq-gym {args.command}: interrupted", file=sys.stderr)
        return 130
    _emit(args, result, _HUMAN.get(args.command))
    if getattr(args, "exit_message", None):  # a command that reports and then fails
        print(f"arq-gym {args.command}: error: {args.exit_message}", file=sys.stderr)
    return int(getattr(args, "exit_status", 0))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
