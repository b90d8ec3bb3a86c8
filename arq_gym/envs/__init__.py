"""Gymnasium environments of arq-gym.

``import arq_gym`` registers (idempotently):

========================  ==================  =============  =======  =========  ======  ========
id                        model               dataset        sigma    budget     reward  fidelity
========================  ==================  =============  =======  =========  ======  ========
ARQ-ResNet20-v0           resnet20            CIFAR-10       0.25     1/64 FP32  acr     search
ARQ-LeNet5-v0             lenet5              Fashion-MNIST  0.25     1/64 FP32  acr     search
ARQ-MobileNetV2-CIFAR-v0  mobilenet_v2_cifar  CIFAR-10       0.25     1/64 FP32  acr     search
ARQ-ResNet50-v0           resnet50            ImageNet       (ckpt)   1/64 FP32  acr     search
ARQ-MobileNetV2-v0        mobilenet_v2        ImageNet       (ckpt)   1/64 FP32  acr     search
ARQ-Custom-v0             (yours)             (yours)        (yours)  1/64 FP32  acr     search
========================  ==================  =============  =======  =========  ======  ========

ARQ-Custom-v0 searches a user's own network: ``model=`` (an ``nn.Module`` or
``"package.module:factory"``), ``data=`` and ``sigma=`` (:mod:`arq_gym.custom`); without them
``gym.make`` fails with one line saying what is missing.

The ImageNet ids need ``data_dir`` (the validation set, :mod:`arq_gym.data.imagenet`) and
``checkpoint`` (Cohen et al.'s ResNet-50s load unchanged, :mod:`arq_gym.models.imagenet`):
nothing can be shipped for them, and ``gym.make`` without them fails with one line saying where
to get them. Their fidelity presets are sized for a GPU: at "search" one episode certifies 100
images with n_p = 500 (51,000 forward passes of 4.1 G MACs for ResNet-50).

ARQ-LeNet5-v0 searches every layer (``keep_first_last=None``): its first convolution holds 28%
of the MACs, so pinning it at 8 bits alone would cost 1.76% of the FP32 BOPs, more than the
whole 1/64 budget. ARQ-MobileNetV2-CIFAR-v0 is a width-0.5 MobileNetV2 for 32 x 32 inputs
(53 layers, 17 inverted-residual blocks with depthwise convolutions) trained here with sigma 0.25
noise and shipped with its IRS caches, so that depthwise layers are searched on real data. Every
id is the same class, :class:`~arq_gym.envs.arq_env.ARQEnv`; every
keyword argument of ``gym.make`` is documented there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from arq_gym.envs.arq_env import ARQEnv

__all__ = ["ENTRY_POINT", "ENV_SPECS", "ARQEnv", "register_envs"]

ENTRY_POINT = "arq_gym.envs.arq_env:ARQEnv"

#: registered ids and the keyword arguments they fix (others take ARQEnv's defaults)
ENV_SPECS: dict[str, dict[str, Any]] = {
    "ARQ-ResNet20-v0": {
        "model": "resnet20",
        "dataset": "cifar10",
        "budget": 1 / 64,
        "reward": "acr",
        "keep_first_last": 8,
        "fidelity": "search",
    },
    "ARQ-LeNet5-v0": {
        "model": "lenet5",
        "dataset": "fashion_mnist",
        "budget": 1 / 64,
        "reward": "acr",
        "keep_first_last": None,
        "fidelity": "search",
    },
    "ARQ-ResNet50-v0": {
        "model": "resnet50",
        "dataset": "imagenet",
        "budget": 1 / 64,
        "reward": "acr",
        "keep_first_last": 8,
        "fidelity": "search",
    },
    "ARQ-MobileNetV2-v0": {
        "model": "mobilenet_v2",
        "dataset": "imagenet",
        "budget": 1 / 64,
        "reward": "acr",
        "keep_first_last": 8,
        "fidelity": "search",
    },
    "ARQ-MobileNetV2-CIFAR-v0": {
        "model": "mobilenet_v2_cifar",
        "dataset": "cifar10",
        "budget": 1 / 64,
        "reward": "acr",
        "keep_first_last": 8,
        "fidelity": "search",
    },
    "ARQ-Custom-v0": {
        "model": None,
        "dataset": None,
        "budget": 1 / 64,
        "reward": "acr",
        "keep_first_last": 8,
        "fidelity": "search",
    },
}
#: where a user gets what the ImageNet ids need (nothing can be shipped for them)
IMAGENET_NEEDS = {
    "checkpoint": "a noise-trained ImageNet model: Cohen et al.'s published ResNet-50s "
                  "(github.com/locuslab/smoothing, models/imagenet/resnet50/noise_0.25/"
                  "checkpoint.pth.tar, with sigma=0.25), or your own in torchvision's layout",
    "data_dir": "the ImageNet validation set from image-net.org, as class folders "
                "(val/<wnid>/*.JPEG) or a flat folder with labels.txt",
}


def register_envs() -> list[str]:
    """Register every id of :data:`ENV_SPECS` with Gymnasium unless already registered."""
    from gymnasium.envs.registration import register, registry

    for env_id, kwargs in ENV_SPECS.items():
        if env_id not in registry:
            register(id=env_id, entry_point=ENTRY_POINT, kwargs=dict(kwargs))
    return list(ENV_SPECS)


def __getattr__(name: str):
    if name == "ARQEnv":  # imported lazily: importing arq_gym stays light
        from arq_gym.envs.arq_env import ARQEnv

        return ARQEnv
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
