"""Dataset loading: real data, both CIFAR-10 layouts, the download path, and bad input."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import pickle
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from arq_gym import data as D
from arq_gym.cli import main as cli_main
from arq_gym.data.core import CIFAR10_CLASSES


def _fake_cifar(n_train: int = 100, n_test: int = 30, seed: int = 0):
    rng = np.random.default_rng(seed)
    xtr = rng.integers(0, 256, (n_train, 3, 32, 32), dtype=np.uint8)
    ytr = rng.integers(0, 10, n_train)
    xte = rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8)
    yte = rng.integers(0, 10, n_test)
    return xtr, ytr, xte, yte


def _write_cifar_python_tar(path: Path, xtr, ytr, xte, yte) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        parts = np.array_split(np.arange(len(ytr)), 5)
        batches = [(f"data_batch_{i + 1}", p) for i, p in enumerate(parts)]
        for name, x, y in [(n, xtr[p], ytr[p]) for n, p in batches] + [("test_batch", xte, yte)]:
            raw = pickle.dumps({b"data": x.reshape(len(y), -1), b"labels": [int(v) for v in y]})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def _write_png_folder(root: Path, xtr, ytr, xte, yte) -> Path:
    for split, x, y in (("train", xtr, ytr), ("test", xte, yte)):
        counters = [0] * 10
        for img, label in zip(x, y):
            folder = root / split / CIFAR10_CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.transpose(1, 2, 0)).save(folder / f"{counters[label]:04d}.png")
            counters[label] += 1
    return root


def test_real_cifar10_and_fashion_splits(data_dir, isolated_cache):
    cifar = D.load("cifar10", data_dir)
    assert (len(cifar.train), len(cifar.val), len(cifar.test)) == (45000, 5000, 10000)
    assert cifar.train.x.shape[1:] == (3, 32, 32) and cifar.train.x.dtype == np.uint8
    # every class is present in each split, and val is disjoint from train by construction
    assert set(np.unique(cifar.val.y)) == set(range(10))
    mean = cifar.test.x.reshape(-1, 3, 1024).mean((0, 2)) / 255
    np.testing.assert_allclose(mean, [0.4941, 0.4851, 0.4504], atol=2e-3)
    fm = D.load("fashion_mnist", data_dir)
    assert (len(fm.train), len(fm.val), len(fm.test)) == (54000, 6000, 10000)
    assert len(fm.train) + len(fm.val) == 60000
    # the decoded arrays are cached under the user cache dir, keyed by source sha256
    cached = list((isolated_cache / "arrays").glob("*.npz"))
    assert {p.name.split("-")[0] for p in cached} == {"cifar10", "fashion_mnist"}
    again = D.load("cifar10", data_dir)
    np.testing.assert_array_equal(again.val.x, cifar.val.x)


def test_both_cifar_layouts_give_the_same_splits(tmp_path, isolated_cache):
    arrays = _fake_cifar()
    (tmp_path / "a").mkdir()
    tar = _write_cifar_python_tar(tmp_path / "a" / "cifar-10-python.tar.gz", *arrays)
    folder = _write_png_folder(tmp_path / "b" / "cifar10-jpeg", *arrays)
    a = D.load("cifar10", tar.parent)
    b = D.load("cifar10", folder.parent)
    assert (a.format, b.format) == ("cifar-python-tar", "jpeg-dir")
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(a.split(split).x, b.split(split).x)
        np.testing.assert_array_equal(a.split(split).y, b.split(split).y)
    assert (len(a.train), len(a.val), len(a.test)) == (90, 10, 30)
    assert np.all(np.diff(a.test.y) >= 0), "test images are in class-major order"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture()
def local_server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_from_local_server(local_server, isolated_cache, monkeypatch):
    root, base = local_server
    archive = _write_cifar_python_tar(root / "cifar-10-python.tar.gz", *_fake_cifar())
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    monkeypatch.setitem(D.core.DOWNLOADS, "cifar10",
                        [(f"{base}/cifar-10-python.tar.gz", "cifar-10-python.tar.gz", sha)])
    with pytest.raises(D.DataError, match="not found"):
        D.load("cifar10", download=False)
    splits = D.load("cifar10", download=True)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (90, 10, 30)
    assert (isolated_cache / "cifar-10-python.tar.gz").is_file()


def test_download_with_wrong_checksum_leaves_nothing(local_server, isolated_cache, monkeypatch):
    root, base = local_server
    _write_cifar_python_tar(root / "cifar-10-python.tar.gz", *_fake_cifar())
    monkeypatch.setitem(D.core.DOWNLOADS, "cifar10",
                        [(f"{base}/cifar-10-python.tar.gz", "cifar-10-python.tar.gz", "0" * 64)])
    with pytest.raises(D.DataError, match="checksum mismatch"):
        D.load("cifar10", download=True)
    assert not any(isolated_cache.rglob("cifar-10-python.tar.gz*"))


def test_missing_data_dir_is_one_line_error(tmp_path, isolated_cache, capsys):
    with pytest.raises(D.DataError, match="does not exist"):
        D.load("cifar10", tmp_path / "nope")
    assert cli_main(["data", "--data-dir", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not exist" in err and len(err.splitlines()) == 1


def test_truncated_archive_is_reported(tmp_path, isolated_cache):
    good = _write_cifar_python_tar(tmp_path / "cifar-10-python.tar.gz", *_fake_cifar())
    raw = good.read_bytes()
    good.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(D.DataError, match="truncated or corrupt"):
        D.load("cifar10", tmp_path)


def test_truncated_idx_is_reported(tmp_path, data_dir, isolated_cache):
    dest = tmp_path / "fashion-mnist"
    dest.mkdir()
    for f in D.core._FASHION_FILES:
        raw = (data_dir / "fashion-mnist" / f).read_bytes()
        (dest / f).write_bytes(raw[:1000] if f.startswith("t10k-images") else raw)
    with pytest.raises(D.DataError, match="truncated or corrupt"):
        D.load("fashion_mnist", tmp_path)


def test_unknown_dataset():
    with pytest.raises(D.DataError, match="unknown dataset"):
        D.load("tinyimagenet")
    with pytest.raises(D.DataError, match="never downloaded"):  # ImageNet: data_dir or nothing
        D.load("imagenet")


def test_data_command_json(data_dir, isolated_cache, capsys):
    assert cli_main(["data", "--data-dir", str(data_dir), "--json"]) == 0
    import json

    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    by_name = {d["dataset"]: d for d in out["datasets"]}
    assert (by_name["cifar10"]["train"], by_name["cifar10"]["val"], by_name["cifar10"]["test"]) == (
        45000, 5000, 10000)
    assert by_name["fashion_mnist"]["test"] == 10000
    assert len(by_name["cifar10"]["sha256"]) == 64
