"""Quantization-aware fine-tuning (arq_gym.finetune) and quantized checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from arq_gym.finetune import FinetuneConfig, QATNetwork, finetune
from arq_gym.models import load_checkpoint, load_shipped
from arq_gym.policy import Policy
from arq_gym.quant import QuantizedModel, calibration_images, check_int8_kernel

SIGMA = 0.25


@pytest.fixture(scope="module")
def lenet():
    return load_shipped("lenet5", "fashion_mnist", SIGMA)


@pytest.fixture(scope="module")
def splits(data_dir):
    from arq_gym.data import load

    return load("fashion_mnist", data_dir)


@pytest.fixture(scope="module")
def finetuned(lenet, splits, tmp_path_factory):
    """LeNet-5 at uniform W3A3 (every layer), fine-tuned for 2 short epochs."""
    model, meta = lenet
    out = tmp_path_factory.mktemp("ft") / "run"
    policy = Policy.uniform(5, 3, keep_first_last=None)
    cfg = FinetuneConfig(epochs=2, train_images=4000, val_images=1000, lr=0.01)
    summary = finetune(model, meta, policy, out, cfg, splits=splits, progress=False,
                       tensorboard=False)  # fmt: skip
    return out, summary, policy


def _noisy(x_u8: np.ndarray, seed: int = 1) -> torch.Tensor:
    x = torch.from_numpy(x_u8).float() / 255.0
    return x + SIGMA * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))


def test_straight_through_gradients_reach_weights_and_ranges(lenet):
    model, _ = lenet
    torch.manual_seed(0)
    qm = QuantizedModel(model, torch.rand(64, 1, 28, 28), SIGMA)
    net = QATNetwork(qm, Policy.uniform(5, 4, keep_first_last=None)).train()
    x = torch.rand(32, 1, 28, 28) + SIGMA * torch.randn(32, 1, 28, 28)
    loss = F.cross_entropy(net(x), torch.randint(0, 10, (32,)))
    loss.backward()
    for m in net.targets:
        latent = m.parametrizations.weight.original
        assert latent.grad is not None and latent.grad.abs().sum() > 0
    ranges = net.range_parameters()
    assert len(ranges) == 5
    for r in ranges:
        assert r.grad is not None and torch.isfinite(r.grad) and r.grad != 0


def test_qat_network_in_eval_is_the_quantized_model_it_saves(lenet):
    """The saved latent weights + learned ranges, loaded into QuantizedModel, compute what the
    training network computes in evaluation mode."""
    model, meta = lenet
    torch.manual_seed(0)
    qm = QuantizedModel(model, torch.rand(64, 1, 28, 28), SIGMA)
    policy = Policy((8, 4, 3, 5, 8), (8, 4, 3, 5, 8))
    net = QATNetwork(qm, policy)
    with torch.no_grad():  # move the ranges away from the calibrated ones
        for r in net.range_parameters():
            r.mul_(0.8)
    net.eval()
    target = load_shipped("lenet5", "fashion_mnist", SIGMA)[0]
    target.load_state_dict(net.float_state_dict())
    record = net.quantization_record()
    loaded = QuantizedModel(target, torch.rand(64, 1, 28, 28), SIGMA, quantization=record)
    assert loaded.checkpoint_policy == policy
    loaded.apply(loaded.checkpoint_policy)
    x = torch.rand(256, 1, 28, 28) + SIGMA * torch.randn(256, 1, 28, 28)
    with torch.no_grad():
        a, b = net(x), loaded(x)
    assert torch.allclose(a, b, atol=1e-4)
    assert torch.equal(a.argmax(1), b.argmax(1))


def test_short_finetune_lowers_noisy_training_loss(lenet, splits, finetuned):
    model, _ = lenet
    out, summary, policy = finetuned
    calib = calibration_images(splits.train, 512, seed=0)
    # the training images of the run (train_images=4000 takes them evenly spaced), fresh noise
    idx = np.linspace(0, len(splits.train) - 1, 4000).round().astype(int)
    x = _noisy(splits.train.x[idx])
    y = torch.from_numpy(splits.train.y[idx]).long()
    before = QuantizedModel(model, calib, SIGMA).apply(policy)
    ft, meta = load_checkpoint(out / "model.pt")
    after = QuantizedModel(ft, calib, SIGMA, quantization=meta["quantization"])
    after.apply(after.checkpoint_policy)
    with torch.no_grad():
        loss_before = float(F.cross_entropy(before(x), y))
        loss_after = float(F.cross_entropy(after(x), y))
    assert loss_after < loss_before - 0.02, (loss_before, loss_after)
    assert summary["val_noisy_acc"] >= summary["val_noisy_acc_before"]
    assert meta["parent_sha256"] == load_shipped("lenet5", "fashion_mnist", SIGMA)[1]["sha256"]
    assert meta["quantization"]["w_bits"] == list(policy.w_bits)


def test_finetune_outputs_and_resume_refusal(finetuned, lenet, splits):
    out, summary, policy = finetuned
    doc = json.loads((out / "policy.json").read_text())
    assert doc["format"] == "arq-policy/1"
    assert [layer["w_bits"] for layer in doc["layers"]] == list(policy.w_bits)
    assert not (out / "resume.pt").exists()
    assert len(summary["history"]) == 2
    model, meta = lenet
    with pytest.raises(FileExistsError, match="--resume"):
        finetune(model, meta, policy, out, FinetuneConfig(epochs=2), splits=splits,
                 progress=False)  # fmt: skip
    # a finished run resumed returns its summary without training again
    again = finetune(model, meta, policy, out, FinetuneConfig(epochs=2, train_images=4000,
                     val_images=1000), splits=splits, resume=True, progress=False)  # fmt: skip
    assert again["checkpoint_sha256"] == summary["checkpoint_sha256"]
    # but not when the base model or the policy differs from the finished run's
    with pytest.raises(ValueError, match="fine-tuned from the base model"):
        finetune(model, {**meta, "sha256": "0" * 64}, policy, out, FinetuneConfig(epochs=2),
                 splits=splits, resume=True, progress=False)  # fmt: skip
    other = Policy(tuple(8 for _ in policy.w_bits), tuple(8 for _ in policy.a_bits))
    with pytest.raises(ValueError, match="another policy"):
        finetune(model, meta, other, out, FinetuneConfig(epochs=2), splits=splits, resume=True,
                 progress=False)  # fmt: skip


def test_certify_cli_round_trip(finetuned, data_dir, capsys):
    """arq-gym certify --checkpoint certifies the fine-tuned network with its own policy, and
    gives the certificate of the same network built in memory."""
    from arq_gym.cli import main
    from arq_gym.data import load
    from arq_gym.smoothing import certify, evenly_spaced

    out, _summary, policy = finetuned
    args = ["certify", "--checkpoint", str(out / "model.pt"), "--split", "val", "--images", "20",
            "--n0", "20", "--n", "100", "--backend", "reference", "--quiet", "--json",
            "--data-dir", str(data_dir)]  # fmt: skip
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["network"] == "fine-tuned policy of the checkpoint"
    ft, meta = load_checkpoint(out / "model.pt")
    splits = load("fashion_mnist", data_dir)
    qm = QuantizedModel(ft, calibration_images(splits.train, 512, seed=0), SIGMA,
                        quantization=meta["quantization"]).apply(policy)  # fmt: skip
    idx = evenly_spaced(len(splits.val), 20)
    x = torch.from_numpy(splits.val.x[idx]).float() / 255.0
    cert = certify(qm, x, splits.val.y[idx].astype(np.int64), SIGMA, n0=20, n=100, alpha=0.001,
                   batch_size=100, seed=0, image_keys=idx)  # fmt: skip
    assert res["acr"] == pytest.approx(cert.acr)
    assert res["clean_accuracy"] == pytest.approx(cert.clean_accuracy)
    assert main(args[:3] + ["--uniform", "4"] + args[3:]) == 2
    assert "fine-tuned for its own policy" in capsys.readouterr().err


@pytest.mark.skipif(not check_int8_kernel(), reason="no exact oneDNN int8 kernel on this CPU")
def test_int8_path_agrees_on_finetuned_network(finetuned, splits):
    out, _summary, policy = finetuned
    ft, meta = load_checkpoint(out / "model.pt")
    calib = calibration_images(splits.train, 512, seed=0)
    ref = QuantizedModel(ft, calib, SIGMA, quantization=meta["quantization"]).apply(policy)
    fast = QuantizedModel(ft, calib, SIGMA, quantization=meta["quantization"], backend="int8")
    fast.apply(policy)
    assert fast.function_id.startswith("int8")
    x = _noisy(splits.val.x[:2000], seed=3)
    with torch.no_grad():
        agree = float((ref(x).argmax(1) == fast(x).argmax(1)).float().mean())
    assert agree >= 0.995, agree


def test_distillation_from_the_fp32_network(lenet, splits, tmp_path):
    """--distill mixes in the KL to the FP32 network's predictions on the same noisy images."""
    model, meta = lenet
    policy = Policy.uniform(5, 3, keep_first_last=None)
    runs = {}
    for w in (0.0, 0.7):
        cfg = FinetuneConfig(epochs=1, train_images=600, val_images=200, distill=w)
        runs[w] = finetune(model, meta, policy, tmp_path / str(w), cfg, splits=splits,
                           progress=False, tensorboard=False)  # fmt: skip
    assert runs[0.7]["config"]["distill"] == 0.7
    assert runs[0.7]["history"][0]["loss"] != runs[0.0]["history"][0]["loss"]
    with pytest.raises(ValueError, match="distill"):
        finetune(model, meta, policy, tmp_path / "bad", FinetuneConfig(distill=1.5), splits=splits)


def test_noisy_batches_stack_copies_of_the_same_augmented_images(splits):
    """copies=m: m noisy copies of the same crop/flip, the labels once."""
    from arq_gym.finetune import NoisyBatches

    small = splits.train.subset(np.arange(64))
    for sigma in (0.0, 0.5):
        gen = torch.Generator().manual_seed(0)
        x, y = next(NoisyBatches(small, sigma, 16, gen, crop=True, copies=2).epoch())
        assert x.shape[0] == 32 and y.shape == (16,)
        gap = (x[:16] - x[16:]).std().item()
        assert gap == 0.0 if sigma == 0 else abs(gap - sigma * 2**0.5) < 0.05


def test_finetune_follows_the_base_models_noise_recipe(lenet, splits, tmp_path):
    """A model trained with the consistency regulariser is fine-tuned with it (its recipe from
    the checkpoint's training config) unless told otherwise; the recipe is recorded and a
    finished run of another recipe is not silently reused."""
    from arq_gym.finetune import PLAIN_RECIPE, noise_recipe

    model, meta = lenet
    consistent = {**meta, "config": {**(meta.get("config") or {}), "consistency": 2.0,
                                     "noise_copies": 2, "consistency_eta": 0.5}}  # fmt: skip
    assert noise_recipe(FinetuneConfig(), meta) == PLAIN_RECIPE
    assert noise_recipe(FinetuneConfig(), consistent) == {"consistency": 2.0, "noise_copies": 2,
                                                          "consistency_eta": 0.5}  # fmt: skip
    assert noise_recipe(FinetuneConfig(consistency=0.0), consistent) == PLAIN_RECIPE
    assert noise_recipe(FinetuneConfig(consistency=1.0, noise_copies=3), meta)["noise_copies"] == 3
    with pytest.raises(ValueError, match="noise_copies >= 2"):
        noise_recipe(FinetuneConfig(consistency=1.0, noise_copies=1), meta)
    with pytest.raises(ValueError, match="distillation and the consistency"):
        noise_recipe(FinetuneConfig(distill=0.5), consistent)

    policy = Policy.uniform(5, 3, keep_first_last=None)
    cfg = FinetuneConfig(epochs=1, train_images=600, val_images=200)
    runs = {name: finetune(model, m, policy, tmp_path / name, cfg, splits=splits, progress=False,
                           tensorboard=False)  # fmt: skip
            for name, m in (("plain", meta), ("consistency", consistent))}
    assert runs["plain"]["recipe"] == PLAIN_RECIPE
    assert runs["consistency"]["recipe"]["consistency"] == 2.0
    assert runs["consistency"]["history"][0]["loss"] != runs["plain"]["history"][0]["loss"]
    with pytest.raises(ValueError, match="noise recipe"):
        finetune(model, consistent, policy, tmp_path / "plain", cfg, splits=splits, resume=True,
                 progress=False)  # fmt: skip


def test_committed_nipq_runs_keep_their_identity():
    """The recipe settings, left at None, leave the identity of NIPQ runs written before them
    unchanged, so the committed tables still resume."""
    from pathlib import Path

    from arq_gym.finetune import config_identity
    from arq_gym.nipq import NIPQConfig

    root = Path(__file__).resolve().parents[1] / "results"
    phase1 = sorted(root.glob("resnet20_cifar10_s*_finetuned/nipq/nipq_phase1.pt"))
    assert phase1
    for path in phase1:
        saved = torch.load(path, map_location="cpu", weights_only=False)["identity"]["config"]
        assert config_identity(NIPQConfig(**saved)) == saved
