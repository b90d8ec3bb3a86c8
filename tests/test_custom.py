"""A user's own model and data (``ARQ-Custom-v0``, :mod:`arq_gym.custom`)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import nn

import arq_gym  # noqa: F401  (registers the ids)
from arq_gym.custom import load_custom, splits_from_data
from arq_gym.envs import ENV_SPECS

TINY = {"fidelity": "smoke", "images": 4, "n": 200, "n_p": 50, "device": "cpu",
        "keep_first_last": None, "budget": 1 / 32}  # fmt: skip


class TinyNet(nn.Module):
    """Two convolutions (one depthwise) and a linear head, for 3 x 12 x 12 images."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        x = torch.relu(self.dw(torch.relu(self.conv(x))))
        return self.fc(x.mean((2, 3)))


def tiny_data(n: int = 60, hwc: bool = False):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, 12, 12, 3) if hwc else (n, 3, 12, 12), dtype=np.uint8)
    return x, rng.integers(0, 4, n)


def test_custom_id_is_registered_and_needs_model_data_and_sigma(tmp_path):
    assert "ARQ-Custom-v0" in ENV_SPECS and ENV_SPECS["ARQ-Custom-v0"]["model"] is None
    with pytest.raises(ValueError, match="model= is missing"):
        gym.make("ARQ-Custom-v0", **TINY)
    with pytest.raises(ValueError, match="needs data="):
        gym.make("ARQ-Custom-v0", model=TinyNet(), sigma=0.25, **TINY)
    with pytest.raises(ValueError, match="needs sigma="):
        gym.make("ARQ-Custom-v0", model=TinyNet(), data=tiny_data(), **TINY)


def test_one_episode_of_a_users_model(tmp_path):
    torch.manual_seed(0)
    env = gym.make("ARQ-Custom-v0", model=TinyNet(), data=tiny_data(), sigma=0.25,
                   cache_dir=str(tmp_path), **TINY)  # fmt: skip
    problem = env.unwrapped.problem
    assert problem.num_layers == 3 and problem.dataset == "custom"
    assert [layer.depthwise for layer in problem.layers] == [False, True, False]
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    done, steps = False, 0
    while not done:
        obs, reward, terminated, truncated, info = env.step(np.array([0.5, 0.5], np.float32))
        done, steps = terminated or truncated, steps + 1
    assert steps == 3 and np.isfinite(reward)
    assert info["bops_fraction"] <= 1 / 32 + 1e-12 and len(info["w_bits"]) == 3


def test_splits_of_one_pair_are_disjoint_and_cover_it():
    x, y = tiny_data(100, hwc=True)  # channels last is recognised
    s = splits_from_data((x, y))
    assert [len(s.train), len(s.val), len(s.test)] == [20, 40, 40]
    assert s.train.x.shape[1:] == (3, 12, 12) and s.info.classes == ("0", "1", "2", "3")
    rows = {tuple(v.x.reshape(len(v), -1)[i, :8]) for v in (s.train, s.val, s.test)
            for i in range(len(v))}  # fmt: skip
    assert len(rows) == 100
    assert splits_from_data((x, y)).sha256 == s.sha256  # seeded: the same split every time


def test_a_torch_dataset_of_float_images_is_stored_as_uint8():
    x, y = tiny_data(30)
    ds = torch.utils.data.TensorDataset(torch.from_numpy(x).float() / 255.0, torch.from_numpy(y))
    s = splits_from_data({"train": ds, "val": ds, "test": (x, y)})
    assert np.array_equal(s.train.x, x) and np.array_equal(s.test.x, x)
    assert np.array_equal(s.val.y, y)


def test_a_factory_string_names_the_model(data_dir):
    from arq_gym.data import load

    fm = load("fashion_mnist", data_dir)
    data = {k: (getattr(fm, k).x[:40], getattr(fm, k).y[:40]) for k in ("train", "val", "test")}
    net, meta, _ = load_custom("arq_gym.models.architectures:LeNet5", data, 0.5)
    assert isinstance(net, nn.Module) and meta["architecture"] == "arq_gym.models.architectures:LeNet5"
    assert meta["sigma"] == 0.5 and meta["dataset"] == "custom"


@pytest.mark.parametrize("model, data, match", [
    ("no_such_module:f", tiny_data(), "cannot import model factory"),
    ("torch.nn:Flatten", tiny_data(), "no quantizable"),
    (nn.Sequential(nn.Conv1d(3, 4, 3)), tiny_data(), r"layer '0' \(Conv1d\) cannot be quantized"),
    (TinyNet(classes=2), tiny_data(), r"class scores \[batch, classes >= 4\]"),
    (TinyNet(), (np.zeros((5, 12, 12, 12, 3), np.uint8), np.zeros(5, int)), "images must be"),
    (TinyNet(), (np.full((6, 3, 12, 12), 2.0), np.zeros(6, int)), r"float images must lie in \[0, 1\]"),
    (TinyNet(), (np.zeros((6, 3, 12, 12), np.uint8), np.zeros(5, int)), "labels must be 6"),
    (TinyNet(), {"train": tiny_data()}, "data mapping lacks val, test"),
])  # fmt: skip
def test_bad_models_and_data_fail_with_one_line(model, data, match):
    with pytest.raises(ValueError, match=match) as err:
        gym.make("ARQ-Custom-v0", model=model, data=data, sigma=0.25, **TINY)
    assert "\n" not in str(err.value)


def test_the_shipped_lenet_as_a_users_model_earns_the_shipped_reward(data_dir, tmp_path):
    """The real path: the shipped LeNet-5 and its own Fashion-MNIST splits, given as a user's
    model and arrays, make the same problem as ARQ-LeNet5-v0 and certify the same policy alike."""
    from arq_gym.data import load
    from arq_gym.models import load_shipped

    net, _ = load_shipped("lenet5", "fashion_mnist", 0.25)
    fm = load("fashion_mnist", data_dir)
    data = {k: (getattr(fm, k).x, getattr(fm, k).y) for k in ("train", "val", "test")}
    kw = {"fidelity": "smoke", "images": 8, "n": 500, "n_p": 100, "device": "cpu",
          "cache_dir": str(tmp_path), "bits_mode": "tied"}  # fmt: skip
    shipped = gym.make("ARQ-LeNet5-v0", data_dir=str(data_dir), **kw).unwrapped.problem
    custom = gym.make("ARQ-Custom-v0", model=net, data=data, sigma=0.25,
                      keep_first_last=None, **kw).unwrapped.problem  # fmt: skip
    assert custom.data_sha256 == shipped.data_sha256
    bits = [6, 4, 4, 5, 8]
    a, _ = shipped.evaluate(bits)
    b, _ = custom.evaluate(bits)
    assert np.array_equal(a.predict, b.predict) and np.allclose(a.radius, b.radius)


def test_the_own_model_example_runs(data_dir, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "own_model.py"
    out = subprocess.run([sys.executable, str(example), "--train-batches", "20", "--episodes", "1",
                          "--data-dir", str(data_dir)], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "ARQ_GYM_CACHE": str(tmp_path)})  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "4 quantizable layers" in out.stdout and "episode 0: W [" in out.stdout
