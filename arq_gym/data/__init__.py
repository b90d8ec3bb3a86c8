"""Datasets: CIFAR-10 and Fashion-MNIST as uint8 arrays with fixed, documented splits.

Where the data is looked for, in order (the first root holding a known layout wins):

1. an explicit ``data_dir`` argument (``--data-dir`` on the command line),
2. the ``ARQ_GYM_DATA`` environment variable (folders separated by ``os.pathsep``; a folder
   there that does not exist is an error, not skipped),
3. the user cache directory (``$ARQ_GYM_CACHE`` or ``$XDG_CACHE_HOME/arq-gym`` or
   ``~/.cache/arq-gym``), where downloads land,
4. for Fashion-MNIST also ``/usr/share/datasets/fashion-mnist`` (Debian package
   ``dataset-fashion-mnist``).

When nothing is found the official archive is downloaded into the user cache directory with a
progress bar and checksum verification, unless downloads are disabled (``download=False`` or
``ARQ_GYM_NO_DOWNLOAD=1``).

Splits (fixed for every source and format, see :mod:`arq_gym.data.splits`): the training images
are put in class-major order (label 0 first; within a class the original dataset order), then a
permutation seeded with 0 holds 10% of them out as the validation split: CIFAR-10 45,000 train /
5,000 val / 10,000 test, Fashion-MNIST 54,000 train / 6,000 val / 10,000 test. Test images are
also in class-major order. The base models never see the validation split; searches use it and
final tables use the test split.
"""

from arq_gym.data.core import (
    DATASETS,
    DataError,
    DatasetInfo,
    Split,
    Splits,
    data_roots,
    describe,
    find_root,
    load,
    user_cache_dir,
)

__all__ = [
    "DATASETS",
    "DataError",
    "DatasetInfo",
    "Split",
    "Splits",
    "data_roots",
    "describe",
    "find_root",
    "load",
    "user_cache_dir",
]
