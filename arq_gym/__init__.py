"""arq-gym: mixed-precision quantization that keeps randomized-smoothing certificates.

``import arq_gym`` registers the Gymnasium environments (``ARQ-ResNet20-v0``,
``ARQ-LeNet5-v0``); see :mod:`arq_gym.envs`.
"""

__version__ = "0.1.0"


def _register() -> None:
    """Register the environments with Gymnasium (idempotent; see :mod:`arq_gym.envs`)."""
    from arq_gym.envs import register_envs

    register_envs()


_register()
