"""ImageNet for the paper's ResNet-50 and MobileNetV2 benchmarks: the validation set, decoded
lazily with Cohen et al.'s preprocessing.

The package never downloads ImageNet (its licence asks each user to get it from image-net.org).
``data_dir`` is either

* a class-folder tree (torchvision's ImageFolder layout): ``<data_dir>/val/<wnid>/*.JPEG`` or
  ``<data_dir>/<wnid>/*.JPEG``; classes are the folder names in sorted order (the order the
  published models were trained with), or
* a flat folder of images with ``labels.txt`` (lines ``file label``, label an integer).

Preprocessing (Cohen et al.): resize the shorter side to 256 (bilinear), centre crop 224, pixels
in [0, 1] (the model normalises). Images are decoded with Pillow only when a subset needs them,
with a progress bar, and each decoded image is cached on disk as a memory-mapped ``uint8``
``.npy`` keyed by the file it came from (path, size, modification time), so the next run does not
decode again.

Splits of the N validation images in sorted order (they never overlap): ``test`` is all of them
(the paper's 500 images are every 100th of 50,000, :func:`arq_gym.smoothing.evenly_spaced`,
indices ``0 mod 4``); ``val`` (search images) the images with index ``2 mod 4``; ``train`` (the
calibration images of the activation ranges) the images with index ``1 mod 4``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from arq_gym.data.core import DataError, DatasetInfo, Split, user_cache_dir

__all__ = ["IMAGENET_CLASSES", "LazySplit", "find_images", "load_imagenet", "preprocess"]

IMAGENET_CLASSES = 1000
EXTENSIONS = (".jpeg", ".jpg", ".png")
RESIZE, CROP = 256, 224
WHERE = ("the ImageNet validation set from image-net.org, as class folders "
         "(val/<wnid>/*.JPEG) or a flat folder with labels.txt")  # fmt: skip


def preprocess(path: Path) -> np.ndarray:
    """Cohen et al.'s evaluation transform: shorter side to 256, centre crop 224; uint8 CHW."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        scale = RESIZE / min(w, h)
        img = img.resize((max(RESIZE, round(w * scale)), max(RESIZE, round(h * scale))),
                         Image.BILINEAR)  # fmt: skip
        w, h = img.size
        left, top = (w - CROP) // 2, (h - CROP) // 2
        img = img.crop((left, top, left + CROP, top + CROP))
        return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()


def find_images(data_dir: str | os.PathLike) -> tuple[list[Path], np.ndarray, list[str]]:
    """The validation images under ``data_dir``, their labels and the class names."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"ImageNet data_dir {str(root)!r} is not a folder; give {WHERE}")
    if (root / "val").is_dir():
        root = root / "val"
    labels_file = root / "labels.txt"
    if labels_file.is_file():
        files, labels = [], []
        for i, line in enumerate(labels_file.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                name, label = line.split()
                labels.append(int(label))
            except ValueError:
                raise DataError(f"{labels_file}:{i + 1}: expected 'file label', got {line!r}") from None
            files.append(root / name)
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise DataError(f"{labels_file} names {len(missing)} missing files, e.g. {missing[0]}")
        classes = [str(c) for c in range(max(labels) + 1)]
    else:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        files, labels = [], []
        for label, cls in enumerate(classes):
            for f in sorted((root / cls).iterdir()):
                if f.suffix.lower() in EXTENSIONS:
                    files.append(f)
                    labels.append(label)
    if not files:
        raise DataError(f"no images found in {root}; give {WHERE}")
    return files, np.asarray(labels, dtype=np.int64), classes


class LazyImages:
    """``images[idx]`` decodes (or reads from the cache) the images ``idx`` as uint8
    ``[len(idx), 3, 224, 224]``."""

    def __init__(self, files: list[Path], cache: Path, progress: bool = True):
        self.files, self.cache, self.progress = files, cache, progress

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.files), 3, CROP, CROP)

    def _cached(self, path: Path) -> Path:
        st = path.stat()
        key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
        return self.cache / f"{key.hexdigest()[:24]}.npy"

    def __getitem__(self, idx) -> np.ndarray:
        from tqdm.auto import tqdm

        idx = np.atleast_1d(np.asarray(idx))
        out = np.empty((len(idx), 3, CROP, CROP), dtype=np.uint8)
        todo = []
        for k, i in enumerate(idx):
            cached = self._cached(self.files[int(i)])
            if cached.is_file():
                out[k] = np.load(cached, mmap_mode="r")
            else:
                todo.append((k, int(i), cached))
        self.cache.mkdir(parents=True, exist_ok=True)
        for k, i, cached in tqdm(todo, desc="decode ImageNet", unit="img",
                                 disable=not self.progress or len(todo) < 20):  # fmt: skip
            try:
                out[k] = preprocess(self.files[i])
            except OSError as exc:
                raise DataError(f"cannot decode {self.files[i]}: {exc}") from None
            tmp = cached.with_name(cached.name + f".{os.getpid()}.tmp.npy")
            np.save(tmp, out[k])
            os.replace(tmp, cached)
        return out


@dataclass
class LazySplit:
    """A split whose images are decoded only when a subset asks for them."""

    files: list[Path]
    y: np.ndarray
    cache: Path

    def __len__(self) -> int:
        return len(self.y)

    @property
    def x(self) -> LazyImages:
        return LazyImages(self.files, self.cache)

    def subset(self, idx) -> Split:
        idx = np.asarray(idx)
        return Split(self.x[idx], self.y[idx])

    def sha256(self) -> str:
        """Identifies the files (names and sizes) and labels, without decoding them."""
        h = hashlib.sha256()
        for f, label in zip(self.files, self.y):
            h.update(f"{f.name}|{f.stat().st_size}|{int(label)}\n".encode())
        return h.hexdigest()


def load_imagenet(data_dir: str | os.PathLike | None):
    """The ImageNet validation set under ``data_dir`` as :class:`~arq_gym.data.Splits` with lazy
    splits (see the module docstring). DataError (one line) without ``data_dir``."""
    from arq_gym.data.core import Splits

    if data_dir is None:
        raise DataError(f"ImageNet is never downloaded by arq-gym: pass data_dir= with {WHERE}")
    files, labels, classes = find_images(data_dir)
    cache = user_cache_dir() / "imagenet"
    order = np.arange(len(files))

    def part(mask: np.ndarray) -> LazySplit:
        return LazySplit([files[i] for i in order[mask]], labels[mask], cache)

    test = part(np.ones(len(files), dtype=bool))
    names = tuple(classes) + tuple(f"class{i}" for i in range(len(classes), IMAGENET_CLASSES))
    info = DatasetInfo("imagenet", names, (3, CROP, CROP), (0.485, 0.456, 0.406),
                       (0.229, 0.224, 0.225))  # fmt: skip
    return Splits(name="imagenet", train=part(order % 4 == 1), val=part(order % 4 == 2),
                  test=test, source=str(Path(data_dir).expanduser()), format="imagenet-val",
                  sha256=test.sha256(), info=info)  # fmt: skip
