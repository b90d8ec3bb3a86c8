"""Checkpoint files: a state_dict plus metadata (architecture, dataset, sigma, accuracy, ...)."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch
from torch import nn

from arq_gym.data.download import sha256_of

CHECKPOINT_FORMAT = "arq-checkpoint/1"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or not what it claims to be."""


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message, at most 160 characters."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _load_failure(exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in a few words (torch's own
    message is a page of advice about ``weights_only=False`` that does not apply here)."""
    text = str(exc)
    if found := re.search(r"Unsupported global: GLOBAL ([\w.]+)", text):
        return f"it holds a Python object ({found.group(1)}) that a checkpoint never contains"
    if ("Weights only load failed" in text
            or isinstance(exc, (pickle.UnpicklingError, KeyError, EOFError))):  # fmt: skip
        # (torch reads an arbitrary file as its legacy format and fails with a KeyError
        # naming a byte, e.g. '101' for a text file)
        return "it is not a file written by torch.save"
    if "failed finding central directory" in text or "PytorchStreamReader" in text:
        return "it is not a file written by torch.save (or it is truncated)"
    return _first_line(exc)


#: Cohen et al.'s architecture names -> the package's (their ImageNet models)
COHEN_ARCHITECTURES = {"resnet50": "resnet50", "mobilenet_v2": "mobilenet_v2"}


def _load_cohen(path: Path, blob: dict) -> tuple[nn.Module, dict]:
    """A checkpoint in the layout of Cohen et al.'s published models: ``{"arch", "state_dict"}``
    with ``1.module.`` key prefixes (see :mod:`arq_gym.models.imagenet`). Their sigma is not in
    the file (it is in the folder name, ``noise_0.25``): the metadata's ``sigma`` is None and
    the caller passes it."""
    from arq_gym.models.architectures import build
    from arq_gym.models.imagenet import load_imagenet_state_dict

    arch = COHEN_ARCHITECTURES.get(str(blob["arch"]))
    if arch is None:
        raise CheckpointError(f"{str(path)!r} is a Cohen et al. checkpoint of {blob['arch']!r}; "
                              f"known: {', '.join(COHEN_ARCHITECTURES)}")  # fmt: skip
    model = build(arch, "imagenet")
    try:
        load_imagenet_state_dict(model, blob["state_dict"])
    except ValueError as exc:
        raise CheckpointError(f"{str(path)!r}: {exc}") from None
    return model, {"architecture": arch, "dataset": "imagenet", "sigma": None,
                   "format": "cohen-et-al"}  # fmt: skip


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
    except Exception as exc:
        # torch's own message here is a page of weights_only advice that does not apply: a
        # checkpoint of this package holds tensors and plain metadata only
        raise CheckpointError(
            f"{str(path)!r} is not an arq-gym checkpoint: {_load_failure(exc)}; pass a file "
            "written by `arq-gym train` (or `arq-gym finetune`)"
        ) from exc
    if isinstance(blob, dict) and "arch" in blob and "state_dict" in blob and "meta" not in blob:
        model, meta = _load_cohen(path, blob)
        meta["sha256"] = digest
        meta["path"] = str(path)
        return model.to(device).eval(), meta
    if not isinstance(blob, dict) or "state_dict" not in blob or "meta" not in blob:
        raise CheckpointError(
            f"{str(path)!r} is not an arq-gym checkpoint (no state_dict and meta); pass a file "
            "written by `arq-gym train`"
        )
    try:
        meta = dict(blob["meta"])
        model = build(meta["architecture"], meta.get("dataset"))
        model.load_state_dict(blob["state_dict"])
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"cannot load checkpoint {path}: {type(exc).__name__}: "
                              f"{_first_line(exc)}") from exc
    meta["sha256"] = digest
    meta["path"] = str(path)
    return model.to(device).eval(), meta
