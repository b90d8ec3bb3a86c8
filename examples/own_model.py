"""Your own model: train a small CNN with Gaussian noise, then search its bit-widths.

    python examples/own_model.py                       # about a minute on a 2-core CPU
    python examples/own_model.py --train-batches 50    # quicker, a weaker model

``ARQ-Custom-v0`` takes any PyTorch classifier (images in [0, 1] in, class scores out,
normalisation inside) with its data and the noise level it was trained with:

    env = gym.make("ARQ-Custom-v0", model=net, data=(images, labels), sigma=0.25)

``model`` may also be a string ``"package.module:factory"`` (importable in worker processes);
``data`` an ``(images, labels)`` pair of uint8 arrays (split 20/40/40 into train, val, test), a
torch Dataset, or a ``{"train", "val", "test"}`` mapping of either. Here Fashion-MNIST stands in
for your data (``arq-gym data --download`` fetches it, or set ARQ_GYM_DATA).
"""

from __future__ import annotations

import argparse

import gymnasium as gym
import numpy as np
import torch
from torch import nn

import arq_gym  # noqa: F401  (registers the environments)
from arq_gym.data import load


class SmallCNN(nn.Module):
    """Your network: two convolutions (the second depthwise) and a linear head."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )  # fmt: skip
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features((x - 0.286) / 0.353).flatten(1))


def train_with_noise(net: nn.Module, x: np.ndarray, y: np.ndarray, sigma: float, batches: int,
                     seed: int = 0) -> None:  # fmt: skip
    """Gaussian data augmentation at ``sigma`` (what randomized smoothing certifies)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    net.train()
    for step in range(batches):
        idx = torch.randint(len(x), (128,), generator=gen)
        images = torch.from_numpy(x[idx.numpy()]).float() / 255.0
        images = images + sigma * torch.randn(images.shape, generator=gen)
        loss = nn.functional.cross_entropy(net(images), torch.from_numpy(y[idx.numpy()]).long())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == batches - 1:
            print(f"batch {step + 1}/{batches}: noisy training loss {loss.item():.3f}")
    net.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sigma", type=float, default=0.25, help="training and smoothing noise")
    parser.add_argument("--train-batches", type=int, default=400, help="SGD steps of 128 images")
    parser.add_argument("--fidelity", default="smoke", choices=["smoke", "search", "paper"])
    parser.add_argument("--episodes", type=int, default=3, help="random episodes to run")
    parser.add_argument("--data-dir", default=None, help="where Fashion-MNIST is")
    args = parser.parse_args()

    torch.manual_seed(0)
    fm = load("fashion_mnist", args.data_dir)  # your own arrays go here
    net = SmallCNN()
    train_with_noise(net, fm.train.x, fm.train.y, args.sigma, args.train_batches)
    data = {"train": (fm.train.x, fm.train.y), "val": (fm.val.x, fm.val.y),
            "test": (fm.test.x, fm.test.y)}  # fmt: skip

    # every layer searched (keep_first_last=None): the first convolution of a net this small
    # holds a large share of the MACs, as in ARQ-LeNet5-v0
    env = gym.make("ARQ-Custom-v0", model=net, data=data, sigma=args.sigma,
                   fidelity=args.fidelity, keep_first_last=None, render_mode="ansi")  # fmt: skip
    problem = env.unwrapped.problem
    print(f"\n{problem.num_layers} quantizable layers, FP32 ACR {problem.fp_acr:.4f} on "
          f"{len(problem.images)} {problem.fidelity.split} images; action space "
          f"{env.action_space}")  # fmt: skip
    env.action_space.seed(0)
    for episode in range(args.episodes):
        env.reset(seed=episode)
        terminated = False
        while not terminated:
            _, reward, terminated, _, info = env.step(env.action_space.sample())
        print(f"episode {episode}: W {info['w_bits']} A {info['a_bits']} "
              f"BOPs {info['bops_fraction']:.4%}, ACR {info['acr']:.4f}, reward {reward:.4f}")
    print()
    print(env.render())
    env.close()


if __name__ == "__main__":
    main()
