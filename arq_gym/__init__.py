"""arq-gym: mixed-precision quantization that keeps randomized-smoothing certificates.

``import arq_gym`` registers the Gymnasium environments (``ARQ-ResNet20-v0``,
``ARQ-LeNet5-v0``); see :mod:`arq_gym.envs`. It also makes forks safe and applies the
thread setting ``ARQ_GYM_THREADS``; see :mod:`arq_gym.threads`.
"""

__version__ = "0.1.0"


def _register() -> None:
    """Register the environments with Gymnasium (idempotent; see :mod:`arq_gym.envs`)."""
    from arq_gym.envs import register_envs

    register_envs()


def _threads() -> None:
    """Install the at-fork handler (a forked child runs one OpenMP thread instead of hanging)
    and apply ``ARQ_GYM_THREADS`` when it is set (see :mod:`arq_gym.threads`)."""
    from arq_gym.threads import _apply_at_import

    _apply_at_import()


_register()
_threads()
