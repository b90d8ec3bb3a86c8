"""The ``arq-gym`` command line (also ``python -m arq_gym``).

Every command takes ``--json`` to print one machine-readable JSON object as its last line and
exits non-zero with a one-line error on bad input. Each command is one module of
:mod:`arq_gym.cli.commands` that registers itself with :func:`command` (pip's layout); this
module holds the registry, the parser and :func:`main`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable, str]] = {}
#: human-readable printers of a command's result (the default prints ``key: value`` lines)
HUMAN: dict[str, Callable[[dict], None]] = {}
#: the command modules, imported when the parser is built (kept lazy for a fast import)
COMMAND_MODULES = ("data", "envs", "train", "certify", "search", "benchmark", "table",
                   "pareto", "bench_speed", "finetune", "nipq", "export")


class CLIError(Exception):
    """Bad input: printed as one line, exit status 2."""


def command(name: str, help: str, human: Callable[[dict], None] | None = None):
    """Register ``fn(args) -> dict`` as a subcommand whose arguments ``add`` declares;
    ``human`` prints its result when ``--json`` is not given."""

    def wrap(add):
        def deco(fn):
            COMMANDS[name] = (add, fn, help)
            if human is not None:
                HUMAN[name] = human
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


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="arq-gym",
        description="Search mixed-precision quantization policies that keep randomized-smoothing "
                    "classifiers certifiably robust (also: python -m arq_gym).",
        epilog="arq-gym COMMAND --help shows a command's options.")  # fmt: skip
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
    """Import the command modules (each registers its command)."""
    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(f"arq_gym.cli.commands.{name}")


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
    _emit(args, result, HUMAN.get(args.command))
    if getattr(args, "exit_message", None):  # a command that reports and then fails
        print(f"arq-gym {args.command}: error: {args.exit_message}", file=sys.stderr)
    return int(getattr(args, "exit_status", 0))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
