"""Checkpoint files: a state_dict plus metadata (architecture, dataset, sigma, accuracy, ...)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from arq_gym.data.download import sha256_of

CHECKPOINT_FORMAT = "arq-checkpoint/1"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or not what it claims to be."""


def save_checkpoint(model: nn.Module, meta: dict, path: str | os.PathLike) -> str:
    """Write ``{"format", "state_dict", "meta"}`` atomically; return the file's sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save({"format": CHECKPOINT_FORMAT, "state_dict": state, "meta": meta}, tmp)
    os.replace(tmp, path)
    return sha256_of(path)


def load_checkpoint(path: str | os.PathLike, sha256: str | None = None,
                    device: str = "cpu") -> tuple[nn.Module, dict]:
    """Build the model a checkpoint describes and load its weights, in eval mode.

    If ``sha256`` is given the file must match it (shipped models are verified this way).
    The returned metadata gains ``"sha256"`` (of the file) and ``"path"``.
    """
    from arq_gym.models.architectures import build

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    digest = sha256_of(path)
    if sha256 is not None and digest != sha256:
        raise CheckpointError(
            f"checkpoint {path.name} has sha256 {digest[:16]}..., expected {sha256[:16]}...; "
            "the file is corrupt or was replaced: reinstall the package or retrain it"
        )
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        meta = dict(blob["meta"])
        model = build(meta["architecture"], meta.get("dataset"))
        model.load_state_dict(blob["state_dict"])
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"cannot load checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    meta["sha256"] = digest
    meta["path"] = str(path)
    return model.to(device).eval(), meta
