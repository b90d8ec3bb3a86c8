"""Architectures, checkpoints, the zoo, and resumable noise-augmented training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from arq_gym.models import (
    CheckpointError,
    ZooError,
    build,
    load_checkpoint,
    load_shipped,
    save_checkpoint,
    shipped_models,
    zoo,
)


def test_resnet20_shape_and_parameters():
    model = build("resnet20").eval()
    # 0.27M parameters (He et al. 2016, Table 6) with parameter-free option-A shortcuts
    assert sum(p.numel() for p in model.parameters()) == 269_722
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    for depth in (32, 44, 56):
        n_conv = sum(isinstance(m, torch.nn.Conv2d) for m in build(f"resnet{depth}").modules())
        assert n_conv == depth - 1


def test_normalisation_is_the_first_layer():
    model = build("resnet20").eval()
    x = torch.rand(1, 3, 32, 32)
    mean, std = model.normalize.mean, model.normalize.std
    manual = model.conv1((x - mean) / std)
    assert torch.allclose(model.conv1(model.normalize(x)), manual)


def test_lenet_shape():
    assert build("lenet5")(torch.rand(3, 1, 28, 28)).shape == (3, 10)


def test_unknown_architecture():
    with pytest.raises(ValueError, match="unknown architecture 'vgg'"):
        build("vgg")


def test_checkpoint_roundtrip_and_sha_check(tmp_path):
    model = build("lenet5")
    path = tmp_path / "m.pt"
    sha = save_checkpoint(model, {"architecture": "lenet5", "dataset": "fashion_mnist", "sigma": 0.5}, path)
    loaded, meta = load_checkpoint(path, sha256=sha)
    assert meta["sigma"] == 0.5 and meta["sha256"] == sha
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(path, sha256="0" * 64)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="not an arq-gym checkpoint: .*truncated"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_shipped_models_verify_and_load():
    entries = shipped_models()
    assert entries, "the package ships base models"
    for e in entries:
        model, meta = load_shipped(e["architecture"], e["dataset"], e["sigma"])
        assert meta["sha256"] == e["sha256"] and not model.training
        assert meta["epochs"] >= 1 and 0.0 < meta["clean_test_accuracy"] <= 1.0


def test_shipped_model_with_wrong_sha_is_refused(tmp_path, monkeypatch):
    entry = shipped_models()[0]
    fake_dir = tmp_path / "weights"
    fake_dir.mkdir()
    (fake_dir / entry["file"]).write_bytes(
        (zoo.WEIGHTS_DIR / entry["file"]).read_bytes() + b"tampered")
    (fake_dir / "manifest.json").write_text(json.dumps({"models": [entry]}))
    monkeypatch.setattr(zoo, "WEIGHTS_DIR", fake_dir)
    monkeypatch.setattr(zoo, "MANIFEST", fake_dir / "manifest.json")
    with pytest.raises(CheckpointError, match="corrupt or was replaced"):
        load_shipped(entry["architecture"], entry["dataset"], entry["sigma"])


def test_shipped_checkpoints_name_no_folder_of_the_training_machine():
    for e in shipped_models():
        _, meta = load_checkpoint(zoo.WEIGHTS_DIR / e["file"])
        meta.pop("path")
        assert zoo.machine_paths(meta) == [], e["file"]


def test_reship_portable_cuts_paths_keeps_weights_and_rekeys_caches(tmp_path, monkeypatch):
    from arq_gym.smoothing import IRSCache

    entry = next(e for e in shipped_models() if e["architecture"] == "lenet5")
    model, meta = load_checkpoint(zoo.WEIGHTS_DIR / entry["file"])
    for k in ("sha256", "path"):
        meta.pop(k)
    meta["config"] = {**meta.get("config", {}), "init": "/somewhere/runs/parent.pt"}
    meta["inits"] = ["C:\\runs\\grandparent.pt"]  # in a list, Windows-style
    weights, caches = tmp_path / "weights", tmp_path / "caches"
    old = save_checkpoint(model, meta, weights / entry["file"])
    assert zoo.machine_paths(meta) == ["config.init", "inits.0"]
    (weights / "manifest.json").write_text(json.dumps({"models": [{**entry, "sha256": old}]}))
    shipped_cache = next((zoo.WEIGHTS_DIR.parent / "caches").glob(f"{entry['sha256'][:16]}_*.npz"))
    cache = IRSCache.load(shipped_cache)
    cache.meta["checkpoint_sha256"] = old
    cache.save(caches / f"{old[:16]}_smoke.npz")
    monkeypatch.setattr(zoo, "WEIGHTS_DIR", weights)
    monkeypatch.setattr(zoo, "MANIFEST", weights / "manifest.json")

    assert zoo.reship_portable(entry["file"], cache_dir=caches) == (old, new := zoo.shipped_models()[0]["sha256"])
    assert new != old and zoo.shipped_models()[0]["previous_sha256"] == [old]
    again, meta2 = load_shipped(entry["architecture"], entry["dataset"], entry["sigma"])
    assert meta2["config"]["init"] == "parent.pt" and meta2["inits"] == ["grandparent.pt"]
    assert meta2["sha256"] == new
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    assert [p.name for p in caches.iterdir()] == [f"{new[:16]}_smoke.npz"]
    moved = IRSCache.load(caches / f"{new[:16]}_smoke.npz")
    assert moved.meta["checkpoint_sha256"] == new and (moved.counts == cache.counts).all()
    assert zoo.reship_portable(entry["file"], cache_dir=caches) == (new, new)  # nothing left to cut
    with pytest.raises(ZooError, match="not in the manifest"):
        zoo.reship_portable("nothing.pt", cache_dir=caches)


def test_ship_keeps_no_folder_of_the_training_machine(tmp_path, monkeypatch):
    entry = next(e for e in shipped_models() if e["architecture"] == "lenet5")
    model, meta = load_checkpoint(zoo.WEIGHTS_DIR / entry["file"])
    meta = {k: v for k, v in meta.items() if k not in ("sha256", "path")}
    clean = tmp_path / "clean.pt"
    save_checkpoint(model, meta, clean)
    dirty = tmp_path / "dirty.pt"
    save_checkpoint(model, {**meta, "config": {"init": "/somewhere/runs/parent.pt"}}, dirty)
    weights = tmp_path / "weights"
    monkeypatch.setattr(zoo, "WEIGHTS_DIR", weights)
    monkeypatch.setattr(zoo, "MANIFEST", weights / "manifest.json")
    caches = tmp_path / "caches"
    first = zoo.ship(clean, cache_dir=caches)
    assert (weights / first["file"]).read_bytes() == clean.read_bytes()  # copied as it is
    assert "previous_sha256" not in first
    caches.mkdir()
    for name in (f"{first['sha256'][:16]}_smoke.npz", "0123456789abcdef_smoke.npz"):
        (caches / name).write_bytes(b"cache")
    shipped = zoo.ship(dirty, cache_dir=caches)
    _, meta2 = load_shipped(entry["architecture"], entry["dataset"], entry["sigma"])
    assert meta2["config"]["init"] == "parent.pt" and meta2["sha256"] == shipped["sha256"]
    assert len(zoo.shipped_models()) == 1  # the same (architecture, dataset, sigma) replaced
    # the replaced file's sha256 is kept in the history, its caches go, other caches stay
    assert zoo.shipped_models()[0]["previous_sha256"] == [first["sha256"]]
    assert [p.name for p in caches.iterdir()] == ["0123456789abcdef_smoke.npz"]
    assert zoo.ship(dirty, cache_dir=caches)["previous_sha256"] == [first["sha256"]]  # again: kept


def test_unknown_shipped_architecture_or_sigma():
    with pytest.raises(ZooError, match="no shipped model for architecture 'vgg'"):
        load_shipped("vgg", sigma=0.25)
    with pytest.raises(ZooError, match="shipped sigmas"):
        load_shipped("lenet5", sigma=0.33)


def _train_cmd(out, epochs, extra=()):
    return [sys.executable, "-m", "arq_gym", "train", "--model", "lenet5", "--sigma", "0.25",
            "--epochs", str(epochs), "--train-images", "3000", "--out", str(out), "--json", *extra]


def test_training_resumes_after_sigkill(tmp_path, data_dir):
    env = {**os.environ, "ARQ_GYM_DATA": str(data_dir), "ARQ_GYM_CACHE": str(tmp_path / "cache")}
    ref = tmp_path / "ref.pt"
    done = subprocess.run(_train_cmd(ref, 3), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    meta = json.loads(done.stdout.strip().splitlines()[-1])
    assert meta["epochs"] == 3 and meta["clean_test_accuracy"] > 0.5  # learns, not chance (0.1)

    out = tmp_path / "run.pt"
    resume_file = tmp_path / "run.pt.resume.pt"
    proc = subprocess.Popen(_train_cmd(out, 3), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not resume_file.exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert resume_file.exists() and not out.exists()
    # without --resume the existing run is not overwritten
    again = subprocess.run(_train_cmd(out, 3), env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "pass --resume" in again.stderr
    resumed = subprocess.run(_train_cmd(out, 3, ["--resume"]), env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, _ = load_checkpoint(ref)
    b, meta_b = load_checkpoint(out)
    assert [h["epoch"] for h in meta_b["history"]] == [1, 2, 3]
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(x.float(), y.float(), atol=1e-5), name


def test_warm_start_records_lineage_and_checks_the_parent(tmp_path, data_dir, one_torch_thread, capsys):
    from arq_gym.cli import main

    parent = zoo.WEIGHTS_DIR / zoo.find_shipped("lenet5", None, 0.25)["file"]
    _, parent_meta = load_checkpoint(parent)
    out = tmp_path / "warm.pt"
    assert main(["train", "--model", "lenet5", "--sigma", "0.25", "--epochs", "1", "--lr", "0.01",
                 "--train-images", "2000", "--init", str(parent), "--out", str(out),
                 "--data-dir", str(data_dir)]) == 0
    _, meta = load_checkpoint(out)
    assert meta["parent_sha256"] == parent_meta["sha256"]
    assert meta["config"]["init"] == parent.name  # the file name, no folder of this machine
    assert meta["total_epochs"] == parent_meta["epochs"] + 1
    # one epoch on 2,000 images from a trained parent stays far above what that run alone reaches
    assert meta["clean_test_accuracy"] > 0.75
    wrong = zoo.WEIGHTS_DIR / zoo.find_shipped("lenet5", None, 0.5)["file"]
    assert main(["train", "--model", "lenet5", "--sigma", "0.25", "--epochs", "1", "--init", str(wrong),
                 "--out", str(tmp_path / "bad.pt"), "--data-dir", str(data_dir)]) == 2
    assert "--init checkpoint" in capsys.readouterr().err and not (tmp_path / "bad.pt").exists()
    # a noise curriculum opts in to a parent of another sigma, and the lineage says which
    assert main(["train", "--model", "lenet5", "--sigma", "0.25", "--epochs", "1", "--init", str(wrong),
                 "--init-other-sigma", "--train-images", "500", "--out", str(tmp_path / "cur.pt"),
                 "--data-dir", str(data_dir)]) == 0
    _, meta = load_checkpoint(tmp_path / "cur.pt")
    assert meta["sigma"] == 0.25 and meta["parent_sigma"] == 0.5


def test_consistency_loss_is_cross_entropy_when_copies_agree_and_penalises_disagreement():
    import torch.nn.functional as F

    from arq_gym.train import consistency_loss

    torch.manual_seed(0)
    y = torch.tensor([0, 2, 1])
    one = torch.randn(3, 4)
    same = one.expand(2, 3, 4)
    loss = consistency_loss(same, y, lam=10.0, eta=0.0)
    assert torch.allclose(loss, F.cross_entropy(one, y))  # KL = 0
    apart = torch.stack([one, one + 3 * torch.randn(3, 4)])
    ce2 = F.cross_entropy(apart.reshape(6, 4), y.repeat(2))
    assert consistency_loss(apart, y, lam=0.0, eta=0.0) == ce2
    assert consistency_loss(apart, y, lam=10.0, eta=0.0) > ce2 + 0.1  # disagreement costs
    # the KL term's gradient pulls the copies together
    logits = apart.clone().requires_grad_(True)
    consistency_loss(logits, y, lam=10.0, eta=0.0).backward()
    step = logits - 0.01 * logits.grad
    gap = (F.softmax(apart[0], -1) - F.softmax(apart[1], -1)).abs().sum()
    assert (F.softmax(step[0], -1) - F.softmax(step[1], -1)).abs().sum() < gap


def test_training_with_consistency_runs_and_records_it(tmp_path, data_dir, one_torch_thread, capsys):
    from arq_gym.cli import main

    out = tmp_path / "cons.pt"
    assert main(["train", "--model", "lenet5", "--sigma", "0.5", "--epochs", "1", "--train-images",
                 "512", "--consistency", "20", "--out", str(out), "--data-dir", str(data_dir)]) == 0
    _, meta = load_checkpoint(out)
    assert meta["config"]["consistency"] == 20.0 and meta["config"]["noise_copies"] == 2
    assert meta["history"][0]["loss"] > 0
    assert main(["train", "--model", "lenet5", "--consistency", "5", "--noise-copies", "1",
                 "--out", str(tmp_path / "bad.pt"), "--data-dir", str(data_dir)]) == 2
    assert "noise_copies >= 2" in capsys.readouterr().err


def test_swa_checkpoint_is_the_average_of_the_epoch_end_weights(tmp_path, data_dir, one_torch_thread, capsys):
    from arq_gym.cli import main
    from arq_gym.train import TrainConfig, _lr_factor

    common = ["train", "--model", "lenet5", "--sigma", "0.25", "--train-images", "512", "--swa-lr",
              "0.02", "--data-dir", str(data_dir)]
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    assert main(common + ["--epochs", "1", "--swa-epochs", "1", "--out", str(one)]) == 0
    assert main(common + ["--epochs", "2", "--swa-epochs", "2", "--out", str(two)]) == 0
    # the same seed and constant lr: the first epoch of both runs is the same
    w1 = torch.load(str(one) + ".resume.pt", weights_only=False)["model"]
    w2 = torch.load(str(two) + ".resume.pt", weights_only=False)["model"]
    avg, meta = load_checkpoint(two)
    assert meta["config"]["swa_epochs"] == 2
    for name, p in avg.named_parameters():
        assert torch.allclose(p, (w1[name] + w2[name]) / 2, atol=1e-6), name
        assert not torch.allclose(p, w2[name], atol=1e-4), name  # not just the last weights
    # the schedule: cosine from lr to swa_lr, then constant
    f = _lr_factor(TrainConfig(epochs=4, swa_epochs=2, lr=0.1, swa_lr=0.01), steps_per_epoch=10)
    assert f(0) == 1.0 and abs(f(10) - 0.55) < 1e-9 and abs(f(20) - 0.1) < 1e-12 and f(39) == f(20)
    assert main(common + ["--epochs", "1", "--swa-epochs", "2", "--out", str(tmp_path / "bad.pt")]) == 2
    assert "swa_epochs must be in [0, epochs=1]" in capsys.readouterr().err


def test_distillation_loss_vanishes_at_the_teacher_and_pulls_towards_it():
    from arq_gym.train import distillation_loss

    torch.manual_seed(0)
    teacher_logits = torch.randn(5, 10)
    for t in (1.0, 4.0):
        probs = (teacher_logits / t).softmax(-1)
        assert distillation_loss(teacher_logits, probs, t).abs() < 1e-5  # the student is the teacher
        student = torch.randn(5, 10, requires_grad=True)
        before = distillation_loss(student, probs, t)
        assert before > 0.05
        before.backward()
        with torch.no_grad():
            assert distillation_loss(student - 0.5 * student.grad, probs, t) < before


def test_distilled_student_learns_from_its_teacher_not_the_labels(tmp_path, data_dir, one_torch_thread,
                                                                   monkeypatch, capsys):
    import dataclasses

    import arq_gym.train as train_module
    from arq_gym.cli import main
    from arq_gym.models import zoo

    real_load = train_module.load_data

    def shuffled_labels(name, data_dir=None):  # the training labels say nothing about the images
        data = real_load(name, data_dir)
        y = np.random.default_rng(0).permutation(data.train.y)
        return dataclasses.replace(data, train=dataclasses.replace(data.train, y=y))

    monkeypatch.setattr(train_module, "load_data", shuffled_labels)
    entry = zoo.find_shipped("lenet5", None, 0.25)
    teacher_path = zoo.WEIGHTS_DIR / entry["file"]
    common = ["train", "--model", "lenet5", "--sigma", "0.25", "--epochs", "2", "--train-images",
              "4096", "--lr", "0.1", "--data-dir", str(data_dir)]
    plain, taught = tmp_path / "plain.pt", tmp_path / "taught.pt"
    assert main(common + ["--out", str(plain)]) == 0
    assert main(common + ["--teacher", str(teacher_path), "--distill", "1", "--out", str(taught)]) == 0
    acc = {p.name: load_checkpoint(p)[1]["noisy_test_accuracy"] for p in (plain, taught)}
    # alpha = 1: the labels are not used, all the student knows comes from the teacher
    assert acc["plain.pt"] < 0.2 and acc["taught.pt"] > 0.4, acc
    _, meta = load_checkpoint(taught)
    assert meta["teachers"] == [{"file": teacher_path.name, "sha256": entry["sha256"],
                                 "architecture": "lenet5"}]
    assert meta["config"]["teachers"] == [teacher_path.name] and meta["config"]["distill"] == 1.0
    wrong = zoo.WEIGHTS_DIR / zoo.find_shipped("lenet5", None, 0.5)["file"]
    assert main(common + ["--teacher", str(wrong), "--out", str(tmp_path / "bad.pt")]) == 2
    assert "(dataset, sigma)" in capsys.readouterr().err and not (tmp_path / "bad.pt").exists()
    assert main(common + ["--distill", "0.5", "--out", str(tmp_path / "bad.pt")]) == 2
    assert "distillation needs both teachers" in capsys.readouterr().err
