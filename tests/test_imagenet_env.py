"""The ImageNet benchmarks end to end at a tiny setting: a synthetic ImageFolder of JPEGs and
randomly initialised networks saved in Cohen et al.'s checkpoint layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from arq_gym.data import DataError
from arq_gym.data.imagenet import find_images, load_imagenet, preprocess
from arq_gym.models import build

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("imagenet") / "val"
    rng = np.random.default_rng(0)
    for c, wnid in enumerate(("n01440764", "n01443537", "n01484850")):
        (root / wnid).mkdir(parents=True)
        for i in range(8):
            w, h = int(rng.integers(240, 400)), int(rng.integers(240, 400))
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / wnid / f"ILSVRC2012_val_{c}{i:03d}.JPEG")
    return root.parent


def _cohen_checkpoint(arch: str, path) -> None:
    torch.manual_seed(0)
    model = build(arch)
    torch.save({"arch": arch, "state_dict": {f"1.module.{k}": v
                                             for k, v in model.state_dict().items()}}, path)  # fmt: skip


def test_folder_splits_and_preprocessing(image_folder, monkeypatch, tmp_path):
    monkeypatch.setenv("ARQ_GYM_CACHE", str(tmp_path / "cache"))
    files, labels, classes = find_images(image_folder)
    assert len(files) == 24 and classes[0] == "n01440764" and list(labels[:8]) == [0] * 8
    splits = load_imagenet(image_folder)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 6, 24)
    assert len(splits.info.classes) == 1000
    x = preprocess(files[0])
    assert x.shape == (3, 224, 224) and x.dtype == np.uint8
    sub = splits.val.subset([0, 1])
    assert sub.x.shape == (2, 3, 224, 224) and np.array_equal(sub.x[0], preprocess(splits.val.files[0]))
    assert len(list((tmp_path / "cache" / "imagenet").glob("*.npy"))) == 2  # decoded once, kept
    with pytest.raises(DataError, match="image-net.org"):
        load_imagenet(tmp_path / "nothing")


@pytest.mark.parametrize("env_id, arch", [("ARQ-MobileNetV2-v0", "mobilenet_v2"),
                                          ("ARQ-ResNet50-v0", "resnet50")])  # fmt: skip
def test_one_episode(env_id, arch, image_folder, tmp_path, monkeypatch):
    import gymnasium as gym

    monkeypatch.setenv("ARQ_GYM_CACHE", str(tmp_path / "cache"))
    ckpt = tmp_path / "checkpoint.pth.tar"
    _cohen_checkpoint(arch, ckpt)
    with pytest.raises(ValueError, match="does not record its noise level"):
        gym.make(env_id, data_dir=str(image_folder), checkpoint=str(ckpt))
    env = gym.make(env_id, data_dir=str(image_folder), checkpoint=str(ckpt), sigma=0.25,
                   images=2, n=100, n_p=10, device="cpu", backend="reference",
                   cache_dir=str(tmp_path / "irs"))  # fmt: skip
    layers = env.unwrapped.num_layers
    assert layers == {"mobilenet_v2": 53, "resnet50": 54}[arch]
    env.reset(seed=0)
    for _ in range(layers):
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert terminated and info["bops_fraction"] <= 1 / 64 and isinstance(reward, float)
    assert len(info["w_bits"]) == layers and env.observation_space.contains(obs)


@pytest.mark.parametrize("env_id", ["ARQ-ResNet50-v0", "ARQ-MobileNetV2-v0"])
def test_missing_checkpoint_or_data_is_one_line_that_says_where_to_get_it(env_id, tmp_path):
    import gymnasium as gym

    with pytest.raises(ValueError) as info:
        gym.make(env_id, data_dir=str(tmp_path))
    msg = str(info.value)
    assert "needs checkpoint=PATH" in msg and "locuslab/smoothing" in msg and "\n" not in msg
    with pytest.raises(ValueError) as info:
        gym.make(env_id, checkpoint=str(tmp_path / "checkpoint.pth.tar"))
    msg = str(info.value)
    assert "needs data_dir=PATH" in msg and "image-net.org" in msg and "\n" not in msg
