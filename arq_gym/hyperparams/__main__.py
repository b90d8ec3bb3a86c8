"""``python -m arq_gym.hyperparams ALGO`` prints the path of ALGO's rl-zoo3 hyperparameters."""

import sys

from arq_gym.hyperparams import ALGOS, path

if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
    print(f"usage: python -m arq_gym.hyperparams {{{','.join(ALGOS)}}}", file=sys.stderr)
    sys.exit(0 if sys.argv[1:] in (["-h"], ["--help"]) else 2)
try:
    print(path(sys.argv[1]))
except ValueError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)
