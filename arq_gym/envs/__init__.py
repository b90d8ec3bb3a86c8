"""Gymnasium environments of arq-gym.

``import arq_gym`` registers (idempotently):

==================  =========  ==============  =====  ===========  ======  ========
id                  model      dataset         sigma  budget       reward  fidelity
==================  =========  ==============  =====  ===========  ======  ========
ARQ-ResNet20-v0     resnet20   CIFAR-10        0.25   1/64 FP32    acr     search
ARQ-LeNet5-v0       lenet5     Fashion-MNIST   0.25   1/64 FP32    acr     search
==================  =========  ==============  =====  ===========  ======  ========

ARQ-LeNet5-v0 searches every layer (``keep_first_last=None``): its first convolution holds 28%
of the MACs, so pinning it at 8 bits alone would cost 1.76% of the FP32 BOPs, more than the
whole 1/64 budget. Both ids are the same class, :class:`~arq_gym.envs.arq_env.ARQEnv`; every
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
