"""Base-classifier accuracy under noise of single checkpoints and of their ensembles.

Issue 20, sigma 1.0: is there headroom above the best single ResNet-20 that a longer schedule,
a regulariser or distillation could reach? Every checkpoint sees the same noisy copy of each
of the 10,000 test images (seed 0); an ensemble averages the members' softmax outputs.

    python results/scripts/ensemble_noisy_accuracy.py --sigma 1.0 A.pt B.pt C.pt
"""

from __future__ import annotations

import argparse
import itertools
import json

import numpy as np
import torch

from arq_gym.data import load
from arq_gym.models.checkpoint import load_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--sigma", type=float, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    models = [load_checkpoint(p)[0].eval() for p in args.checkpoints]
    test = load("cifar10").test
    gen = torch.Generator().manual_seed(args.seed)
    probs = [[] for _ in models]
    with torch.no_grad():
        for i in range(0, len(test.y), 500):
            x = torch.from_numpy(test.x[i : i + 500]).float().div_(255)
            x = x + args.sigma * torch.randn(x.shape, generator=gen)
            for k, model in enumerate(models):
                probs[k].append(model(x).softmax(1))
    probs = [torch.cat(p).numpy() for p in probs]
    rows = {}
    for size in range(1, len(models) + 1):
        for members in itertools.combinations(range(len(models)), size):
            pred = np.sum([probs[k] for k in members], axis=0).argmax(1)
            name = " + ".join(args.checkpoints[k].rsplit("/", 1)[-1] for k in members)
            rows[name] = float((pred == test.y).mean())
    print(json.dumps({"sigma": args.sigma, "seed": args.seed, "images": len(test.y),
                      "noisy_accuracy": rows}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
