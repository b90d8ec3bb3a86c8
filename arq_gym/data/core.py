"""Finding, decoding, caching and splitting the datasets (see the package docstring)."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from arq_gym.data.download import download as _download
from arq_gym.data.download import sha256_of


class DataError(RuntimeError):
    """A dataset could not be found or read; the message says what was looked for."""


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset: classes, image shape, normalisation statistics."""

    name: str
    classes: tuple[str, ...]
    shape: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]


CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo(
        "cifar10", CIFAR10_CLASSES, (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    ),
    "fashion_mnist": DatasetInfo(
        "fashion_mnist",
        ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
         "bag", "ankle boot"),
        (1, 28, 28),
        (0.2860,),
        (0.3530,),
    ),
}  # fmt: skip
_ALIASES = {"cifar-10": "cifar10", "fashion-mnist": "fashion_mnist", "fmnist": "fashion_mnist"}

#: Official download locations and checksums. Tests replace entries to serve from 127.0.0.1.
DOWNLOADS: dict[str, list[tuple[str, str, str]]] = {
    "cifar10": [
        (
            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
            "cifar-10-python.tar.gz",
            "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
        )
    ],
    "fashion_mnist": [
        (
            f"http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/{name}",
            f"fashion-mnist/{name}",
            sha,
        )
        for name, sha in [
            ("train-images-idx3-ubyte.gz", "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7"),
            ("train-labels-idx1-ubyte.gz", "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056"),
            ("t10k-images-idx3-ubyte.gz", "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa"),
            ("t10k-labels-idx1-ubyte.gz", "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05"),
        ]
    ],
}  # fmt: skip

VAL_FRACTION = 0.1
SPLIT_SEED = 0
_FASHION_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
_SYSTEM_FASHION = Path("/usr/share/datasets/fashion-mnist")


@dataclass
class Split:
    """Images as uint8 ``[N, C, H, W]`` and integer labels ``[N]``."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx) -> Split:
        idx = np.asarray(idx)
        return Split(self.x[idx], self.y[idx])

    def sha256(self) -> str:
        """Content hash of images and labels (identifies a data subset in caches)."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.x).tobytes())
        h.update(np.ascontiguousarray(self.y.astype(np.int64)).tobytes())
        return h.hexdigest()


@dataclass
class Splits:
    """The three splits of a dataset, with where they came from."""

    name: str
    train: Split
    val: Split
    test: Split
    source: str
    format: str
    sha256: str
    info: DatasetInfo = field(repr=False, default=None)  # type: ignore[assignment]

    def split(self, name: str) -> Split:
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r}; expected train, val or test")
        return getattr(self, name)

    def summary(self) -> dict:
        return {
            "dataset": self.name,
            "source": self.source,
            "format": self.format,
            "sha256": self.sha256,
            "train": len(self.train),
            "val": len(self.val),
            "test": len(self.test),
            "classes": len(self.info.classes),
            "image_shape": list(self.info.shape),
        }


def canonical_name(name: str) -> str:
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return key


def user_cache_dir() -> Path:
    """Where downloads and decoded arrays are kept."""
    if env := os.environ.get("ARQ_GYM_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "arq-gym"


def _roots(data_dir: str | os.PathLike | None) -> list[Path]:
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise DataError(
                f"data dir {str(root)!r} does not exist; pass an existing folder holding "
                "CIFAR-10 or Fashion-MNIST (see `arq-gym data --help`)"
            )
        return [root]
    return data_roots()


def data_roots() -> list[Path]:
    """The folders searched for datasets when no ``data_dir`` is given, in order: each folder
    of ``ARQ_GYM_DATA`` (``os.pathsep``-separated), then :func:`user_cache_dir`.

    A set ``ARQ_GYM_DATA`` that names no existing folder is a :class:`DataError`: a typo there
    would otherwise send every command to the cache, or to a download, without a word."""
    roots = []
    if env := os.environ.get("ARQ_GYM_DATA"):
        for part in env.split(os.pathsep):
            if not part:
                continue
            root = Path(part).expanduser()
            if not root.is_dir():
                raise DataError(
                    f"ARQ_GYM_DATA names {part!r}, which is not a folder; set it to the folder "
                    "holding the datasets, or unset it to use the user cache "
                    f"({user_cache_dir()}, where `arq-gym data --download` puts them)"
                )
            roots.append(root)
    roots.append(user_cache_dir())
    return roots


def find_root(name: str, data_dir: str | os.PathLike | None = None) -> Path | None:
    """The folder :func:`load` would read dataset ``name`` from (``data_dir`` or the first of
    :func:`data_roots` holding it), or None when no folder holds it. Never downloads."""
    name = canonical_name(name)
    roots = _roots(data_dir)
    if name == "fashion_mnist" and data_dir is None:
        roots.append(_SYSTEM_FASHION)
    for root in roots:
        if root.is_dir() and _FINDERS[name](root):
            return root
    return None


# --------------------------------------------------------------------------- locating sources


def _find_cifar10(root: Path) -> tuple[Path, str] | None:
    candidates = [
        (root / "cifar-10-batches-py", "cifar-python"),
        (root / "cifar-10-python.tar.gz", "cifar-python-tar"),
        (root / "cifar10" / "cifar-10-batches-py", "cifar-python"),
        (root / "cifar10" / "cifar-10-python.tar.gz", "cifar-python-tar"),
        (root / "cifar10-jpeg" / "cifar10-jpeg.tar.xz", "jpeg-tar"),
        (root / "cifar10-jpeg.tar.xz", "jpeg-tar"),
        (root / "cifar10-jpeg", "jpeg-dir"),
    ]
    if root.name == "cifar-10-batches-py":
        candidates.insert(0, (root, "cifar-python"))
    for path, fmt in candidates:
        if fmt.endswith("dir") or fmt == "cifar-python":
            if fmt == "jpeg-dir" and (path / "train").is_dir() and (path / "test").is_dir():
                return path, fmt
            if fmt == "cifar-python" and (path / "test_batch").is_file():
                return path, fmt
        elif path.is_file():
            return path, fmt
    if (root / "train" / "airplane").is_dir() and (root / "test").is_dir():
        return root, "jpeg-dir"
    return None


def _find_fashion(root: Path) -> tuple[Path, str] | None:
    for path in (root / "fashion-mnist", root / "fashion_mnist", root):
        if all((path / f).is_file() for f in _FASHION_FILES):
            return path, "idx-gz"
    return None


_FINDERS = {"cifar10": _find_cifar10, "fashion_mnist": _find_fashion}


def locate(name: str, data_dir=None, download: bool | None = None) -> tuple[Path, str]:
    """Return ``(path, format)`` of the first source of ``name`` found, downloading if allowed."""
    name = canonical_name(name)
    roots = _roots(data_dir)
    if name == "fashion_mnist" and data_dir is None:
        roots.append(_SYSTEM_FASHION)
    for root in roots:
        if root.is_dir() and (found := _FINDERS[name](root)):
            return found
    if download is None:
        download = os.environ.get("ARQ_GYM_NO_DOWNLOAD", "") in ("", "0") and data_dir is None
    looked = ", ".join(str(r) for r in roots)
    if not download:
        raise DataError(
            f"{name} not found in {looked}; point at it with ARQ_GYM_DATA=/path/to/datasets, "
            "or run `arq-gym data --download` to fetch it into the user cache"
        )
    dest_root = user_cache_dir()
    try:
        for url, rel, sha in DOWNLOADS[name]:
            if not (dest_root / rel).is_file():
                _download(url, dest_root / rel, sha)
    except (OSError, ValueError) as exc:
        raise DataError(f"{name} not found in {looked} and the download failed: {exc}") from exc
    found = _FINDERS[name](dest_root)
    if found is None:  # pragma: no cover - the download wrote the expected layout
        raise DataError(f"{name}: downloaded files not recognised in {dest_root}")
    return found


# --------------------------------------------------------------------------- decoding


def _source_sha256(path: Path) -> str:
    if path.is_file():
        return sha256_of(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _class_major(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(y, kind="stable")
    return x[order], y[order]


def _read_cifar_python(path: Path, fmt: str) -> dict[str, np.ndarray]:
    def batches() -> Iterator[tuple[str, bytes]]:
        if fmt == "cifar-python":
            for f in sorted(path.iterdir()):
                if f.name.startswith(("data_batch_", "test_batch")):
                    yield f.name, f.read_bytes()
        else:
            with tarfile.open(path, "r:gz") as tar:
                for m in tar.getmembers():
                    base = m.name.rsplit("/", 1)[-1]
                    if m.isfile() and base.startswith(("data_batch_", "test_batch")):
                        yield base, tar.extractfile(m).read()  # type: ignore[union-attr]

    train_x, train_y, test_x, test_y = [], [], [], []
    for base, raw in sorted(batches()):
        d = pickle.loads(raw, encoding="bytes")
        x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(d[b"labels"], dtype=np.int64)
        (test_x if base == "test_batch" else train_x).append(x)
        (test_y if base == "test_batch" else train_y).append(y)
    if not train_x or not test_x:
        raise ValueError("missing data_batch_* or test_batch")
    xtr, ytr = _class_major(np.concatenate(train_x), np.concatenate(train_y))
    xte, yte = _class_major(np.concatenate(test_x), np.concatenate(test_y))
    return {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte}


_JPEG_RE = re.compile(r"(?:^|/)(train|test)/([a-z_]+)/(\d+)\.(?:jpe?g|png)$")


def _read_cifar_jpeg(path: Path, fmt: str) -> dict[str, np.ndarray]:
    from PIL import Image

    def files() -> Iterator[tuple[str, bytes]]:
        if fmt == "jpeg-dir":
            for f in path.rglob("*"):
                if f.is_file():
                    yield str(f.relative_to(path)).replace(os.sep, "/"), f.read_bytes()
        else:
            with tarfile.open(path, "r:xz") as tar:
                for m in tar:
                    if m.isfile():
                        yield m.name, tar.extractfile(m).read()  # type: ignore[union-attr]

    label_of = {c: i for i, c in enumerate(CIFAR10_CLASSES)}
    items: dict[str, list] = {"train": [], "test": []}
    for name, raw in tqdm(files(), desc="decode CIFAR-10 JPEG", unit="img", total=60000):
        m = _JPEG_RE.search(name)
        if not m or m.group(2) not in label_of:
            continue
        img = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"), dtype=np.uint8)
        items[m.group(1)].append((label_of[m.group(2)], int(m.group(3)), img.transpose(2, 0, 1)))
    out = {}
    for split in ("train", "test"):
        if not items[split]:
            raise ValueError(f"no {split}/<class>/NNNN.jpg images")
        items[split].sort(key=lambda t: (t[0], t[1]))  # class-major, then original order
        out[f"x_{split}"] = np.stack([t[2] for t in items[split]])
        out[f"y_{split}"] = np.array([t[0] for t in items[split]], dtype=np.int64)
    return out


def _read_idx(raw: bytes) -> np.ndarray:
    data = gzip.decompress(raw)
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError("IDX file is truncated")
    return arr.reshape(dims)


def _read_fashion(path: Path, fmt: str) -> dict[str, np.ndarray]:
    raw = {f: (path / f).read_bytes() for f in _FASHION_FILES}
    xtr = _read_idx(raw[_FASHION_FILES[0]])[:, None]
    ytr = _read_idx(raw[_FASHION_FILES[1]]).astype(np.int64)
    xte = _read_idx(raw[_FASHION_FILES[2]])[:, None]
    yte = _read_idx(raw[_FASHION_FILES[3]]).astype(np.int64)
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise ValueError("image and label counts differ")
    xtr, ytr = _class_major(xtr, ytr)
    xte, yte = _class_major(xte, yte)
    return {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte}


_READERS = {
    "cifar-python": _read_cifar_python,
    "cifar-python-tar": _read_cifar_python,
    "jpeg-tar": _read_cifar_jpeg,
    "jpeg-dir": _read_cifar_jpeg,
    "idx-gz": _read_fashion,
}


def _source_digest(path: Path, fmt: str) -> str:
    if fmt == "idx-gz":
        h = hashlib.sha256()
        for f in _FASHION_FILES:
            h.update(sha256_of(path / f).encode())
        return h.hexdigest()
    return _source_sha256(path)


def split_indices(n: int, val_fraction: float = VAL_FRACTION, seed: int = SPLIT_SEED):
    """Indices (train, val) into the class-major training images; both sorted ascending."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def load(
    name: str,
    data_dir: str | os.PathLike | None = None,
    download: bool | None = None,
    cache: bool = True,
) -> Splits:
    """Load a dataset's train/val/test splits as uint8 arrays (see the package docstring).

    Decoded arrays are cached as ``.npz`` in the user cache directory, keyed by the sha256 of
    the source, so a changed source is decoded again and a stale cache is never used.
    """
    if name.lower() == "imagenet":  # never downloaded; decoded lazily (arq_gym.data.imagenet)
        from arq_gym.data.imagenet import load_imagenet

        return load_imagenet(data_dir)
    name = canonical_name(name)
    path, fmt = locate(name, data_dir, download)
    try:
        digest = _source_digest(path, fmt)
    except OSError as exc:
        raise DataError(f"cannot read {name} source {path}: {exc}") from exc
    cache_file = user_cache_dir() / "arrays" / f"{name}-{digest[:20]}.npz"
    arrays = None
    if cache and cache_file.is_file():
        try:
            with np.load(cache_file) as z:
                arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
        except Exception:  # a damaged cache is rebuilt
            arrays = None
    if arrays is None:
        try:
            arrays = _READERS[fmt](path, fmt)
        except (OSError, EOFError, ValueError, KeyError, tarfile.TarError, pickle.UnpicklingError) as exc:
            raise DataError(
                f"cannot read {name} from {path} ({fmt}): {type(exc).__name__}: {exc}; the file "
                "is truncated or corrupt: delete it and download or copy it again"
            ) from exc
        if cache:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(cache_file.name + f".{os.getpid()}.tmp.npz")
            np.savez(tmp, **arrays)
            os.replace(tmp, cache_file)
    tr_idx, val_idx = split_indices(len(arrays["y_train"]))
    xtr, ytr = arrays["x_train"], arrays["y_train"]
    return Splits(
        name=name,
        train=Split(xtr[tr_idx], ytr[tr_idx]),
        val=Split(xtr[val_idx], ytr[val_idx]),
        test=Split(arrays["x_test"], arrays["y_test"]),
        source=str(path),
        format=fmt,
        sha256=digest,
        info=DATASETS[name],
    )


def describe(data_dir=None, download: bool | None = False, names=None) -> list[dict]:
    """Summaries of the datasets ``names`` (default: every one), used by ``arq-gym data``; a
    dataset that is not found has an ``error`` entry instead."""
    if data_dir is None:
        data_roots()  # a set but missing ARQ_GYM_DATA is one error, not one per dataset
    out = []
    for name in [canonical_name(n) for n in names] if names else DATASETS:
        try:
            out.append(load(name, data_dir, download=download).summary())
        except DataError as exc:
            out.append({"dataset": name, "error": str(exc)})
    return out
