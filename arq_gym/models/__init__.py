"""Model architectures, checkpoints and the zoo of shipped base models."""

from arq_gym.models.architectures import ARCHITECTURES, CifarResNet, LeNet5, Normalize, build
from arq_gym.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from arq_gym.models.zoo import ZooError, load_shipped, shipped_models

__all__ = [
    "ARCHITECTURES",
    "CheckpointError",
    "CifarResNet",
    "LeNet5",
    "Normalize",
    "ZooError",
    "build",
    "load_checkpoint",
    "load_shipped",
    "save_checkpoint",
    "shipped_models",
]
