"""``arq-gym data``: find or prepare the datasets and report what was found."""

from __future__ import annotations

from arq_gym.cli import CLIError, command


def _human_data(res: dict) -> None:
    for d in res["datasets"]:
        if "error" in d:
            print(f"{d['dataset']}: not found ({d['error']})")
        else:
            print(f"{d['dataset']}: {d['format']} at {d['source']}: train {d['train']}, "
                  f"val {d['val']}, test {d['test']} (sha256 {d['sha256'][:16]}...)")


def _add_data(p):
    p.add_argument("--data-dir", help="folder holding the datasets (default: ARQ_GYM_DATA, "
                                      "then the user cache folder)")  # fmt: skip
    p.add_argument("--download", action="store_true",
                   help="download what is missing into the user cache folder")  # fmt: skip
    p.add_argument("--dataset", action="append", default=None, metavar="NAME",
                   help="check only this dataset (cifar10, fashion_mnist; repeatable)")  # fmt: skip
    p.epilog = "exits 1 when a dataset asked for (by default: every one) is not found"


@command("data", "find or prepare the datasets and report what was found", human=_human_data)(_add_data)
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


