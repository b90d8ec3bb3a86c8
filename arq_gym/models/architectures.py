"""Network architectures: CIFAR ResNets (He et al. 2016, option-A shortcuts) and a LeNet-5 CNN;
ResNet-50 and MobileNetV2 with torchvision's names are in :mod:`arq_gym.models.imagenet`.

Every model starts with :class:`Normalize`, so it takes images in [0, 1] pixel space and
randomized-smoothing noise is added before normalisation (Cohen et al.).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` as the model's first layer."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample spatially and zero-pad the new channels (no parameters)."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.extra = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]
        half = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra - half))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = PadShortcut(c_out - c_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: widths 16/32/64, ``n`` basic blocks per stage."""

    def __init__(self, depth: int = 20, num_classes: int = 10, mean=(0.0,) * 3, std=(1.0,) * 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, c_in = [], 16
        for c_out, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(c_in, c_out, stride if i == 0 else 1))
                c_in = c_out
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(self.normalize(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


class LeNet5(nn.Module):
    """LeNet-5-style CNN for 28x28 grayscale images (Fashion-MNIST): 2 convs, 3 linear layers."""

    def __init__(self, num_classes: int = 10, mean=(0.0,), std=(1.0,)):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(self.normalize(x))), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def _imagenet(name: str):
    def ctor(**kw):
        from arq_gym.models import imagenet

        return {"resnet50": imagenet.ResNet50, "mobilenet_v2": imagenet.MobileNetV2,
                "mobilenet_v2_cifar": imagenet.mobilenet_v2_cifar}[name](**kw)  # fmt: skip

    return ctor


#: architecture name -> (constructor, dataset it is built for)
ARCHITECTURES = {
    "resnet20": (lambda **kw: CifarResNet(20, **kw), "cifar10"),
    "resnet32": (lambda **kw: CifarResNet(32, **kw), "cifar10"),
    "resnet44": (lambda **kw: CifarResNet(44, **kw), "cifar10"),
    "resnet56": (lambda **kw: CifarResNet(56, **kw), "cifar10"),
    "lenet5": (lambda **kw: LeNet5(**kw), "fashion_mnist"),
    "resnet50": (_imagenet("resnet50"), "imagenet"),
    "mobilenet_v2": (_imagenet("mobilenet_v2"), "imagenet"),
    "mobilenet_v2_cifar": (_imagenet("mobilenet_v2_cifar"), "cifar10"),
}
#: classes, mean and std of ImageNet (not a dataset the package finds or downloads)
IMAGENET_INFO = (1000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def build(arch: str, dataset: str | None = None) -> nn.Module:
    """A freshly initialised ``arch`` with the dataset's normalisation as its first layer."""
    from arq_gym.data import DATASETS

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    ctor, default_ds = ARCHITECTURES[arch]
    name = dataset or default_ds
    if name == "imagenet":
        classes, mean, std = IMAGENET_INFO
        return ctor(num_classes=classes, mean=mean, std=std)
    info = DATASETS[name]
    return ctor(num_classes=len(info.classes), mean=info.mean, std=info.std)
