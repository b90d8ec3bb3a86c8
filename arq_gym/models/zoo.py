"""The zoo: base models shipped inside the package, verified by sha256 on load.

``weights/manifest.json`` lists every shipped checkpoint with its architecture, dataset, sigma,
file name and sha256. ``load_shipped("resnet20", "cifar10", 0.25)`` returns the model ready for
inference and its metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

from arq_gym.models.checkpoint import load_checkpoint

WEIGHTS_DIR = Path(__file__).parent / "weights"
MANIFEST = WEIGHTS_DIR / "manifest.json"


class ZooError(ValueError):
    """No shipped model matches the request."""


def shipped_models() -> list[dict]:
    """Entries of the manifest (architecture, dataset, sigma, file, sha256, accuracy)."""
    if not MANIFEST.is_file():
        return []
    return json.loads(MANIFEST.read_text())["models"]


def find_shipped(arch: str, dataset: str | None, sigma: float) -> dict:
    """The manifest entry for (arch, dataset, sigma); ZooError naming what exists otherwise."""
    models = shipped_models()
    archs = sorted({m["architecture"] for m in models})
    if arch not in archs:
        raise ZooError(f"no shipped model for architecture {arch!r}; shipped: {', '.join(archs) or 'none'}"
                       "; pass checkpoint=PATH to bring your own")
    for m in models:
        if m["architecture"] == arch and (dataset is None or m["dataset"] == dataset) and \
                abs(float(m["sigma"]) - float(sigma)) < 1e-9:
            return m
    sigmas = sorted(float(m["sigma"]) for m in models if m["architecture"] == arch)
    raise ZooError(f"no shipped {arch} for sigma {sigma}; shipped sigmas: "
                   f"{', '.join(map(str, sigmas))}; pass checkpoint=PATH to bring your own")


def load_shipped(arch: str, dataset: str | None = None, sigma: float = 0.25, device: str = "cpu"):
    """Load a shipped base model, verifying its sha256; returns ``(model, meta)``."""
    entry = find_shipped(arch, dataset, sigma)
    return load_checkpoint(WEIGHTS_DIR / entry["file"], sha256=entry["sha256"], device=device)


def ship(checkpoint: str | Path) -> dict:
    """Copy a trained checkpoint into the package and record it in the manifest (maintainers).

    The file is named ``{architecture}_{dataset}_s{sigma}.pt``; an existing entry for the same
    (architecture, dataset, sigma) is replaced.
    """
    import shutil

    from arq_gym.data.download import sha256_of

    model, meta = load_checkpoint(checkpoint)
    del model
    name = f"{meta['architecture']}_{meta['dataset']}_s{float(meta['sigma'])}.pt"
    WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(checkpoint, WEIGHTS_DIR / name)
    entry = {
        "architecture": meta["architecture"],
        "dataset": meta["dataset"],
        "sigma": float(meta["sigma"]),
        "file": name,
        "sha256": sha256_of(WEIGHTS_DIR / name),
        "epochs": meta.get("total_epochs", meta["epochs"]),
        "dataset_sha256": meta["dataset_sha256"],
        "clean_test_accuracy": meta.get("clean_test_accuracy"),
        "noisy_test_accuracy": meta.get("noisy_test_accuracy"),
    }
    models = [m for m in shipped_models() if m["file"] != name] + [entry]
    models.sort(key=lambda m: (m["architecture"], m["dataset"], m["sigma"]))
    MANIFEST.write_text(json.dumps({"format": "arq-zoo/1", "models": models}, indent=2) + "\n")
    return entry
