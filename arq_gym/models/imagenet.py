"""ImageNet architectures written in the project with torchvision's parameter names: ResNet-50
(bottleneck blocks) and MobileNetV2 (inverted residuals, depthwise and pointwise convolutions,
width multiplier), plus a MobileNetV2 for 32 x 32 inputs.

torchvision cannot be imported beside the pinned torch on the project's machines, so the
networks are written here; their ``state_dict`` keys are torchvision's (``conv1.weight``,
``layer1.0.downsample.0.weight``, ``features.1.conv.0.0.weight``, ``classifier.1.weight``, ...),
so a torchvision-format state dict loads unchanged (:func:`load_imagenet_state_dict`), and so do
Cohen et al.'s noise-trained checkpoints (``{"arch": "resnet50", "state_dict": ...}`` with keys
``1.module.<torchvision key>``: the model was ``nn.Sequential(NormalizeLayer,
DataParallel(resnet50))``).

Inputs are images in [0, 1]; the normalisation (ImageNet mean and std) is the model's first
operation, as in every model of the package, and holds no state (torchvision's dicts have none).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MobileNetV2",
    "ResNet50",
    "load_imagenet_state_dict",
    "mobilenet_v2_cifar",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _Normalize(nn.Module):
    """``(x - mean) / std`` per channel; buffers not saved (torchvision's dicts have none)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck: 1x1, 3x3 (stride here), 1x1 x4, residual."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int = 1):
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                            nn.BatchNorm2d(c_out))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """ResNet-50 (torchvision's layout and names) for 224 x 224 ImageNet images in [0, 1]."""

    def __init__(self, num_classes: int = 1000, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.normalize = _Normalize(mean, std)
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c_in = 64
        for i, (width, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2),
                                                     (512, 3, 2)), start=1):  # fmt: skip
            layer = []
            for b in range(blocks):
                layer.append(Bottleneck(c_in, width, stride if b == 0 else 1))
                c_in = width * Bottleneck.expansion
            setattr(self, f"layer{i}", nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.normalize(x)))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _divisible(v: float, divisor: int = 8) -> int:
    """torchvision's channel rounding: nearest multiple of ``divisor``, never 10% below ``v``."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def _conv_bn_relu6(c_in: int, c_out: int, kernel: int = 3, stride: int = 1,
                   groups: int = 1) -> nn.Sequential:  # fmt: skip
    """torchvision's Conv2dNormActivation with ReLU6 (keys ``.0`` conv, ``.1`` batch norm)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups,
                                   bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU6(inplace=True))  # fmt: skip


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion (unless ``t == 1``), 3x3 depthwise, 1x1 projection
    (linear), residual when the shape is kept."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = int(round(c_in * expand))
        self.use_res_connect = stride == 1 and c_in == c_out
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn_relu6(c_in, hidden, kernel=1))
        layers += [_conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]  # fmt: skip
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


#: (expansion t, channels c, repeats n, stride s) of MobileNetV2's stages
MOBILENET_V2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                        (6, 160, 3, 2), (6, 320, 1, 1))  # fmt: skip


class MobileNetV2(nn.Module):
    """MobileNetV2 (torchvision's layout and names) with a width multiplier; ``small_input``
    keeps the stem and the second stage at stride 1 for 32 x 32 images (CIFAR)."""

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD, small_input: bool = False, dropout: float = 0.2):  # fmt: skip
        super().__init__()
        if not width_mult > 0:
            raise ValueError(f"width_mult must be > 0, got {width_mult}")
        self.normalize = _Normalize(mean, std)
        c_in = _divisible(32 * width_mult)
        last = _divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [_conv_bn_relu6(3, c_in, stride=1 if small_input else 2)]
        for stage, (t, c, n, s) in enumerate(MOBILENET_V2_SETTING):
            c_out = _divisible(c * width_mult)
            stride = 1 if small_input and stage == 1 else s
            for i in range(n):
                features.append(InvertedResidual(c_in, c_out, stride if i == 0 else 1, t))
                c_in = c_out
        features.append(_conv_bn_relu6(c_in, last, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.normalize(x))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def mobilenet_v2_cifar(num_classes: int = 10, mean=(0.0,) * 3, std=(1.0,) * 3,
                       width_mult: float = 0.5) -> MobileNetV2:  # fmt: skip
    """MobileNetV2 for 32 x 32 inputs (stride-1 stem and second stage), width 0.5 by default."""
    return MobileNetV2(num_classes, width_mult, mean, std, small_input=True)


def load_imagenet_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor] | Mapping) -> None:
    """Load a torchvision-format state dict, or a Cohen et al. checkpoint (a dict with
    ``state_dict`` whose keys start with ``1.module.``), into ``model`` (strict). ValueError
    (one line) naming the first missing or unexpected key."""
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    prefixes = ("1.module.", "module.", "1.")
    cleaned = {}
    for key, value in state.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        if key.startswith("0."):  # Cohen's NormalizeLayer (no parameters; skipped)
            continue
        cleaned[key] = value
    own = set(model.state_dict())
    missing, unexpected = sorted(own - set(cleaned)), sorted(set(cleaned) - own)
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise ValueError(f"the state dict does not fit {type(model).__name__}: {what} "
                         f"({len(missing)} missing, {len(unexpected)} unexpected keys)")  # fmt: skip
    model.load_state_dict(cleaned)
