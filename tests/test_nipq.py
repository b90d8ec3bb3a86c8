"""NIPQ: learned bit-widths under a BOPs target (arq_gym.nipq)."""

from __future__ import annotations

import json

import pytest
import torch

from arq_gym.budget import parse_budget
from arq_gym.models import load_checkpoint, load_shipped
from arq_gym.nipq import NIPQConfig, NIPQNetwork, NoiseProxyQuantizer, nipq
from arq_gym.quant import QuantizedModel

SIGMA = 0.25


@pytest.fixture(scope="module")
def lenet():
    return load_shipped("lenet5", "fashion_mnist", SIGMA)


def test_bits_parameterisation_and_rounding():
    q = NoiseProxyQuantizer(signed=False, init_range=2.0)
    assert float(q.continuous_bits().detach()) == pytest.approx(8.0)  # theta = 0
    with torch.no_grad():
        q.theta.fill_(-100.0)
        assert float(q.continuous_bits()) == pytest.approx(2.0)
        q.theta.fill_(100.0)
        assert float(q.continuous_bits()) == pytest.approx(14.0)
        q.theta.copy_(torch.logit(torch.tensor((4.3 - 2.0) / 12.0)))
    assert float(q.continuous_bits().detach()) == pytest.approx(4.3, abs=1e-5)
    assert float(q.bits(stochastic=False).detach()) == 4.0
    torch.manual_seed(0)
    draws = torch.stack([q.bits(stochastic=True).detach() for _ in range(4000)])
    assert set(draws.unique().tolist()) == {4.0, 5.0}
    assert float(draws.mean()) == pytest.approx(4.3, abs=0.03)  # unbiased
    # the straight-through estimator: d bits / d theta is that of the continuous bits
    b = q.bits(stochastic=True)
    b.backward()
    s = torch.sigmoid(q.theta.detach())
    assert float(q.theta.grad) == pytest.approx(float(12.0 * s * (1 - s)), rel=1e-5)


def test_noise_proxy_has_the_rounding_errors_mean_and_variance():
    torch.manual_seed(0)
    q = NoiseProxyQuantizer(signed=True, init_range=1.0, init_bits=4.0)
    x = torch.rand(200_000) * 1.6 - 0.8  # inside the range
    step = float(q.step(q.bits(stochastic=False)).detach())
    q.train()
    noise = (q(x) - x).detach()
    q.eval()
    rounding = (q(x) - x).detach()
    assert float(rounding.abs().max()) <= step / 2 + 1e-6
    for err in (noise, rounding):
        assert float(err.mean()) == pytest.approx(0.0, abs=step * 0.01)
        assert float(err.var()) == pytest.approx(step**2 / 12, rel=0.03)
    # beyond the range values are clipped
    q.eval()
    assert float(q(torch.tensor([5.0])).detach()) == pytest.approx(1.0, abs=step / 2)


def test_cost_gradient_reaches_weight_and_activation_bits(lenet):
    model, _ = lenet
    qm = QuantizedModel(model, torch.rand(32, 1, 28, 28), SIGMA)
    net = NIPQNetwork(qm, keep_first_last=None)
    net.bops(stochastic=True).backward()
    assert len(net.wq) == len(net.aq) == 5
    for q in (*net.wq.values(), *net.aq.values()):
        assert q.theta.grad is not None and float(q.theta.grad) > 0
    # pinned layers are priced at their bits and have no quantizer
    pinned = NIPQNetwork(qm, keep_first_last=8)
    assert sorted(pinned.pinned) == [0, 4] and len(pinned.wq) == 3


def test_parse_budget():
    assert parse_budget("1/64") == 1 / 64
    assert parse_budget(0.5) == 0.5
    for bad in ("x", "0", "2", "1/0"):
        with pytest.raises(ValueError, match="budget"):
            parse_budget(bad)


def test_nipq_run_fits_budget_and_checkpoint_certifies_alike(lenet, data_dir, tmp_path, capsys):
    from arq_gym.cli import main
    from arq_gym.data import load
    from arq_gym.smoothing import certify, evenly_spaced

    model, meta = lenet
    splits = load("fashion_mnist", data_dir)
    cfg = NIPQConfig(epochs=1, hard_epochs=1, budget=1 / 64, keep_first_last=None,
                     train_images=2000, val_images=500)  # fmt: skip
    out = tmp_path / "nipq"
    summary = nipq(model, meta, out, cfg, splits=splits, progress=False, tensorboard=False)
    assert summary["bops_fraction"] <= 1 / 64
    assert len(summary["learned_w_bits"]) == 5 and summary["history"][0]["epoch"] == 1
    doc = json.loads((out / "policy.json").read_text())
    assert [layer["w_bits"] for layer in doc["layers"]] == summary["policy"]["w_bits"]
    ft, ft_meta = load_checkpoint(out / "model.pt")
    assert ft_meta["quantization"]["a_bits"] == summary["policy"]["a_bits"]
    assert ft_meta["finetune"]["policy_source"] == "nipq"

    args = ["certify", "--checkpoint", str(out / "model.pt"), "--split", "val", "--images", "20",
            "--n0", "20", "--n", "100", "--backend", "reference", "--quiet", "--json",
            "--data-dir", str(data_dir)]  # fmt: skip
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    from arq_gym.quant import calibration_images

    qm = QuantizedModel(ft, calibration_images(splits.train, 512, seed=0), SIGMA,
                        quantization=ft_meta["quantization"])  # fmt: skip
    qm.apply(qm.checkpoint_policy)
    idx = evenly_spaced(len(splits.val), 20)
    x = torch.from_numpy(splits.val.x[idx]).float() / 255.0
    cert = certify(qm, x, splits.val.y[idx].astype("int64"), SIGMA, n0=20, n=100, alpha=0.001,
                   batch_size=100, seed=0, image_keys=idx)  # fmt: skip
    assert res["acr"] == pytest.approx(cert.acr)
    assert res["bops_fraction"] == pytest.approx(summary["bops_fraction"])
    # a finished run resumed returns its result without training again
    again = nipq(model, meta, out, cfg, splits=splits, resume=True, progress=False,
                 tensorboard=False)  # fmt: skip
    assert again["checkpoint_sha256"] == summary["checkpoint_sha256"]
