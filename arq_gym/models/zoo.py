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
#: shipped IRS caches of the shipped models, named ``<sha256[:16]>_<fidelity>.npz``
CACHES_DIR = Path(__file__).parent / "caches"
MANIFEST = WEIGHTS_DIR / "manifest.json"


class ZooError(ValueError):
    """No shipped model matches the request.

    ``what`` says what is missing; the message adds how to bring one's own model, phrased for
    Python (``checkpoint=PATH``, the keyword of ``gym.make`` and ``make_problem``). A command
    line rephrases it for its flag with :meth:`advise`."""

    def __init__(self, what: str, advice: str = "pass checkpoint=PATH to bring your own") -> None:
        super().__init__(f"{what}; {advice}")
        self.what = what

    def advise(self, advice: str) -> ZooError:
        """The same error with another piece of advice (e.g. ``--checkpoint PATH``)."""
        return ZooError(self.what, advice)


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
        raise ZooError(f"no shipped model for architecture {arch!r}; shipped: {', '.join(archs) or 'none'}")
    for m in models:
        if m["architecture"] == arch and (dataset is None or m["dataset"] == dataset) and \
                abs(float(m["sigma"]) - float(sigma)) < 1e-9:
            return m
    sigmas = sorted(float(m["sigma"]) for m in models if m["architecture"] == arch)
    raise ZooError(f"no shipped {arch} for sigma {sigma}; shipped sigmas: "
                   f"{', '.join(map(str, sigmas))}")


def load_shipped(arch: str, dataset: str | None = None, sigma: float = 0.25, device: str = "cpu"):
    """Load a shipped base model, verifying its sha256; returns ``(model, meta)``."""
    entry = find_shipped(arch, dataset, sigma)
    return load_checkpoint(WEIGHTS_DIR / entry["file"], sha256=entry["sha256"], device=device)


def ship(checkpoint: str | Path, cache_dir: str | Path | None = None) -> dict:
    """Copy a trained checkpoint into the package and record it in the manifest (maintainers).

    The file is named ``{architecture}_{dataset}_s{sigma}.pt``; an existing entry for the same
    (architecture, dataset, sigma) is replaced: its sha256 joins the new entry's
    ``previous_sha256`` history and its shipped IRS caches (``cache_dir``, default the
    package's) are deleted, since they certify the old network. Metadata that names a folder (a
    warm start's ``config.init`` from before ``arq-gym train`` kept file names only) is re-saved with file
    names only (:func:`portable_metadata`), so that no shipped file names the training machine.
    """
    import shutil

    from arq_gym.data.download import sha256_of
    from arq_gym.models.checkpoint import save_checkpoint

    model, meta = load_checkpoint(checkpoint)
    meta = {k: v for k, v in meta.items() if k not in ("sha256", "path")}
    name = f"{meta['architecture']}_{meta['dataset']}_s{float(meta['sigma'])}.pt"
    WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    if machine_paths(meta):
        save_checkpoint(model, portable_metadata(meta), WEIGHTS_DIR / name)
    else:
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
    replaced = next((m for m in shipped_models() if m["file"] == name), None)
    if replaced is not None:
        history = set(replaced.get("previous_sha256", []))
        if replaced["sha256"] != entry["sha256"]:
            history.add(replaced["sha256"])
            for npz in _caches_dir(cache_dir).glob(f"{replaced['sha256'][:16]}_*.npz"):
                npz.unlink()
        if history:
            entry["previous_sha256"] = sorted(history)
    models = [m for m in shipped_models() if m["file"] != name] + [entry]
    models.sort(key=lambda m: (m["architecture"], m["dataset"], m["sigma"]))
    _write_manifest(models)
    return entry


def _caches_dir(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else CACHES_DIR


def _write_manifest(models: list[dict]) -> None:
    from arq_gym.files import atomic_write_text

    atomic_write_text(MANIFEST, json.dumps({"format": "arq-zoo/1", "models": models}, indent=2) + "\n")


def machine_paths(meta: dict) -> list[str]:
    """Keys of checkpoint metadata (``config.init`` style, dotted) whose value names a folder:
    a shipped checkpoint must not carry a path of the machine that trained it."""
    found = []

    def walk(obj, prefix):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                walk(v, f"{prefix}{i}.")
        elif isinstance(obj, str) and ("/" in obj or "\\" in obj):
            found.append(prefix[:-1])

    walk(meta, "")
    return found


def portable_metadata(meta: dict) -> dict:
    """A copy of checkpoint metadata with every value that names a folder
    (:func:`machine_paths`) cut to its file name."""
    import copy

    meta = copy.deepcopy(meta)
    for key in machine_paths(meta):
        node = meta
        for k in key.split("."):
            parent, k = node, int(k) if isinstance(node, list) else k
            node = parent[k]
        parent[k] = Path(node.replace("\\", "/")).name
    return meta


def reship_portable(file: str, cache_dir: str | Path | None = None) -> tuple[str, str]:
    """Re-save an already shipped checkpoint with :func:`portable_metadata`, and re-key what is
    tied to its sha256 (maintainers); returns ``(old sha256, new sha256)``.

    The weights are unchanged (checked tensor by tensor before the file is replaced); the
    manifest entry gets the new sha256 and lists the old one under ``previous_sha256``, and
    the shipped IRS caches of the old file (``cache_dir``, default the package's) are rewritten
    under the new sha256, since they certify the same network.
    """
    import torch

    from arq_gym.data.download import sha256_of
    from arq_gym.models.checkpoint import save_checkpoint
    from arq_gym.smoothing import IRSCache
    from arq_gym.smoothing.incremental import read_cache_meta

    models = shipped_models()
    entry = next((m for m in models if m["file"] == file), None)
    if entry is None:
        raise ZooError(f"{file!r} is not in the manifest")
    path = WEIGHTS_DIR / file
    model, meta = load_checkpoint(path, sha256=entry["sha256"])
    old = meta.pop("sha256")
    meta.pop("path")
    if not machine_paths(meta):
        return old, old  # nothing to cut: the file stays as it is
    tmp = path.with_name(f".{path.name}.reship")
    try:
        save_checkpoint(model, portable_metadata(meta), tmp)
        fresh = torch.load(tmp, map_location="cpu", weights_only=True)["state_dict"]
        for k, v in model.state_dict().items():
            if not torch.equal(v, fresh[k]):
                raise RuntimeError(f"re-saving changed tensor {k}")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    new = sha256_of(path)
    entry["sha256"] = new
    entry["previous_sha256"] = sorted(set(entry.get("previous_sha256", [])) | {old})
    _write_manifest(models)
    for npz in sorted(_caches_dir(cache_dir).glob(f"{old[:16]}_*.npz")):
        cmeta = read_cache_meta(npz)
        if cmeta is None or cmeta.get("checkpoint_sha256") != old:
            continue
        cache = IRSCache.load(npz)
        cache.meta["checkpoint_sha256"] = new
        cache.save(npz.with_name(new[:16] + npz.name[len(old[:16]):]))
        npz.unlink()
    return old, new
