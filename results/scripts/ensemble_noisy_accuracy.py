"""Base-classifier accuracy under noise of single checkpoints and of their ensembles.

Issue 20, sigma 1.0: is there headroom above the best single ResNet-20 that a longer schedule,
a regulariser or distillation could reach? Every checkpoint sees the same noisy copy of each
of the 10,000 test images (seed 0, through ``arq_gym.train.evaluate``, the noisy test accuracy
that ``arq-gym train`` records); an ensemble averages the members' softmax outputs.
``--split train`` (all 45,000 training images, without crops or flips) or ``val`` measures the
same on another split: a base classifier as accurate under noise on the images it was trained on
as on the test images has no generalisation gap to close, so more data or regularisation cannot
raise it, only capacity or optimisation can.

    python results/scripts/ensemble_noisy_accuracy.py --sigma 1.0 A.pt B.pt C.pt
    python results/scripts/ensemble_noisy_accuracy.py --sigma 1.0 --split train A.pt
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from arq_gym.data import load
from arq_gym.models.checkpoint import load_checkpoint
from arq_gym.train import evaluate


class SoftmaxAverage(torch.nn.Module):
    """The ensemble of ``members``: the mean of their softmax outputs."""

    def __init__(self, members: list[torch.nn.Module]):
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x).softmax(1) for m in self.members]).mean(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--sigma", type=float, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=("train", "val", "test"), default="test")
    args = parser.parse_args()
    models = [load_checkpoint(p)[0] for p in args.checkpoints]
    split = load("cifar10").split(args.split)
    rows = {}
    for size in range(1, len(models) + 1):
        for members in itertools.combinations(range(len(models)), size):
            name = " + ".join(args.checkpoints[k].rsplit("/", 1)[-1] for k in members)
            ensemble = SoftmaxAverage([models[k] for k in members])
            rows[name] = evaluate(ensemble, split.x, split.y, args.sigma, seed=args.seed)
    print(json.dumps({"sigma": args.sigma, "seed": args.seed, "split": args.split,
                      "images": len(split.y), "noisy_accuracy": rows}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
