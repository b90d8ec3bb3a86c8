"""What a user reads: one-line errors for a file that is not a checkpoint, the CLI's own
flag in the zoo's advice, the fidelity spelled out by `arq-gym envs`, data that is missing or
pointed at wrongly, and output files that honour the umask."""

from __future__ import annotations

import datetime
import json
import os
import stat

import pytest
import torch

from arq_gym.cli import main as cli_main


@pytest.fixture()
def umask():
    """Set the process umask for one test (restored afterwards)."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_honour_the_umask(tmp_path, umask, mask, mode):
    from arq_gym.files import atomic_write_bytes, atomic_write_text, file_mode

    umask(mask)
    assert file_mode() == mode
    atomic_write_text(tmp_path / "a.json", "{}")
    atomic_write_bytes(tmp_path / "b.png", b"\x89PNG")
    for name in ("a.json", "b.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
    with open(tmp_path / "plain.txt", "w") as f:  # what a plain open() gives, for comparison
        f.write("x")
    assert stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == mode


def _not_checkpoints(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    obj = tmp_path / "object.pt"
    torch.save({"meta": {}, "when": datetime.datetime(2024, 1, 1)}, obj)
    plain = tmp_path / "plain.pt"
    torch.save({"x": torch.zeros(2)}, plain)
    hello = tmp_path / "hello.pt"  # torch fails on this one with KeyError('101')
    hello.write_text("hello\n")
    return {text: "not a file written by torch.save", obj: "datetime.datetime",
            plain: "no state_dict and meta",
            hello: "not a file written by torch.save"}  # fmt: skip


def test_a_file_that_is_not_a_checkpoint_is_a_short_error(tmp_path, capsys):
    from arq_gym.models import CheckpointError, load_checkpoint

    for path, why in _not_checkpoints(tmp_path).items():
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        msg = str(info.value)
        assert "\n" not in msg and len(msg.replace(str(path), "")) < 200, msg
        assert "is not an arq-gym checkpoint" in msg and why in msg
        assert "weights_only" not in msg
        assert cli_main(["certify", "--checkpoint", str(path), "--images", "1"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "weights_only" not in err and why in err


def test_unknown_model_advises_the_flag_on_the_cli_and_the_keyword_in_python(capsys):
    from arq_gym.models.zoo import ZooError, find_shipped

    assert cli_main(["certify", "--model", "resnet99"]) == 2
    err = capsys.readouterr().err
    assert "resnet99" in err and "--checkpoint PATH" in err and "checkpoint=PATH" not in err
    assert cli_main(["certify", "--model", "resnet20", "--sigma", "0.3"]) == 2
    err = capsys.readouterr().err
    assert "shipped sigmas" in err and "--checkpoint PATH" in err
    with pytest.raises(ZooError, match="pass checkpoint=PATH to bring your own"):
        find_shipped("resnet99", None, 0.25)


def test_envs_spells_out_the_fidelity(capsys):
    from arq_gym.fidelity import FIDELITIES

    assert cli_main(["envs"]) == 0
    out = capsys.readouterr().out
    assert "images=None" not in out and "n=None" not in out and "alpha=None" not in out
    fid = FIDELITIES["search"]
    assert (f"fidelity='search' (images={fid.images} val, n0={fid.n0}, n={fid.n}, "
            f"n_p={fid.n_p}, alpha={fid.alpha})") in out  # fmt: skip
    assert cli_main(["envs", "--json"]) == 0
    envs = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["envs"]
    by_id = {e["id"]: e for e in envs}
    assert by_id["ARQ-ResNet20-v0"]["fidelity"] == {
        "name": "search", "images": fid.images, "split": "val", "n0": fid.n0, "n": fid.n,
        "n_p": fid.n_p, "alpha": fid.alpha}  # fmt: skip
    assert by_id["ARQ-ResNet20-v0"]["kwargs"]["images"] is None  # the keyword's own default


# ---------------------------------------------------------------------- data


def test_set_but_missing_arq_gym_data_is_one_error(tmp_path, isolated_cache, monkeypatch, capsys):
    from arq_gym import data as D

    monkeypatch.setenv("ARQ_GYM_DATA", str(tmp_path / "nope"))
    with pytest.raises(D.DataError, match="ARQ_GYM_DATA names .*nope.*not a folder"):
        D.load("fashion_mnist", download=False)
    assert cli_main(["data"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ARQ_GYM_DATA" in err and "nope" in err
    # an explicit data_dir does not look at the variable
    with pytest.raises(D.DataError, match="does not exist"):
        D.load("fashion_mnist", data_dir=tmp_path / "elsewhere")


def test_data_command_fails_when_a_dataset_is_missing(tmp_path, isolated_cache, monkeypatch,
                                                      capsys):  # fmt: skip
    monkeypatch.setenv("ARQ_GYM_NO_DOWNLOAD", "1")
    assert cli_main(["data"]) == 1
    captured = capsys.readouterr()
    assert "cifar10: not found" in captured.out
    assert "ARQ_GYM_DATA=/path/to/datasets" in captured.err
    assert "arq-gym data --download" in captured.err
    assert cli_main(["data", "--dataset", "cifar10", "--json"]) == 1
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["missing"] == ["cifar10"] and len(res["datasets"]) == 1


def test_tests_find_data_where_the_package_does(tmp_path, monkeypatch):
    """Without ARQ_GYM_DATA the tests look in the user cache folder, where
    `arq-gym data --download` puts the archives (file layout as downloaded)."""
    import conftest

    cache = tmp_path / "cache"
    (cache / "fashion-mnist").mkdir(parents=True)
    (cache / "cifar-10-python.tar.gz").write_bytes(b"")
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):  # fmt: skip
        (cache / "fashion-mnist" / name).write_bytes(b"")
    monkeypatch.delenv("ARQ_GYM_DATA", raising=False)
    monkeypatch.setenv("ARQ_GYM_CACHE", str(cache))
    assert conftest._find_data() == (cache, None)
    monkeypatch.setenv("ARQ_GYM_CACHE", str(tmp_path / "empty"))
    assert conftest._find_data() == (None, None)
    monkeypatch.setenv("ARQ_GYM_DATA", str(tmp_path / "nope"))
    root, error = conftest._find_data()
    assert root is None and "ARQ_GYM_DATA" in error
    monkeypatch.setenv("ARQ_GYM_DATA", str(cache))
    assert conftest._find_data() == (cache, None)
