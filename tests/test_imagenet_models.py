"""ResNet-50 and MobileNetV2 written in the project with torchvision's names; Cohen et al.'s
checkpoint layout; quantization of bottleneck, inverted-residual and depthwise layers."""

from __future__ import annotations

import copy

import pytest
import torch

from arq_gym.cost import bops, fp32_bops
from arq_gym.models import build, load_checkpoint
from arq_gym.models.imagenet import ResNet50, load_imagenet_state_dict
from arq_gym.quant import QuantizedModel, check_int8_kernel, find_layers, uniform_policy

# torchvision's key names, written out (torchvision is not importable beside the pinned torch)
RESNET50_KEYS = ["conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer1.0.conv3.weight",
                 "layer1.0.downsample.0.weight", "layer1.0.downsample.1.running_mean",
                 "layer2.3.bn2.num_batches_tracked", "layer3.5.conv2.weight",
                 "layer4.0.downsample.0.weight", "layer4.2.bn3.bias", "fc.weight", "fc.bias"]  # fmt: skip
MOBILENET_V2_KEYS = ["features.0.0.weight", "features.0.1.running_mean",
                     "features.1.conv.0.0.weight", "features.1.conv.1.weight",
                     "features.1.conv.2.weight", "features.2.conv.0.0.weight",
                     "features.2.conv.1.0.weight", "features.2.conv.2.weight",
                     "features.2.conv.3.running_var", "features.17.conv.3.bias",
                     "features.18.0.weight", "features.18.1.weight", "classifier.1.weight",
                     "classifier.1.bias"]  # fmt: skip


@pytest.mark.parametrize("arch, keys, entries, params", [
    ("resnet50", RESNET50_KEYS, 320, 25_557_032),
    ("mobilenet_v2", MOBILENET_V2_KEYS, 314, 3_504_872),
])  # fmt: skip
def test_torchvision_names_and_sizes(arch, keys, entries, params):
    model = build(arch)
    state = model.state_dict()
    assert len(state) == entries and all(k in state for k in keys)
    assert sum(p.numel() for p in model.parameters()) == params
    assert not any(k.startswith("normalize") for k in state)  # torchvision's dicts have none


def test_depthwise_bops_and_mobilenet_layers():
    model = build("mobilenet_v2").eval()
    layers = find_layers(model, torch.rand(1, 3, 224, 224))
    dw = next(layer for layer in layers if layer.depthwise)
    assert dw.groups == dw.c_in == dw.c_out == 32 and dw.kernel == (3, 3)
    # depthwise: 3*3 * (c_in / groups) * c_out * h_out * w_out MACs = 9 * 1 * 32 * 112 * 112
    assert dw.macs == 9 * 32 * 112 * 112
    w = [8] * len(layers)
    a = [8] * len(layers)
    assert bops(layers, w, a) * 16 == fp32_bops(layers)  # W8A8: 1/16 of FP32, groups included
    assert 300e6 < sum(layer.macs for layer in layers) < 301e6  # published: about 0.3 G MACs


def test_cohen_checkpoint_layout_loads(tmp_path):
    torch.manual_seed(0)
    src = ResNet50().eval()
    blob = {"arch": "resnet50", "epoch": 90,
            "state_dict": {f"1.module.{k}": v for k, v in src.state_dict().items()}}  # fmt: skip
    path = tmp_path / "checkpoint.pth.tar"
    torch.save(blob, path)
    model, meta = load_checkpoint(path)
    assert meta["architecture"] == "resnet50" and meta["dataset"] == "imagenet"
    assert meta["sigma"] is None and len(meta["sha256"]) == 64
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), src(x))
    bad = dict(blob, state_dict={k: v for k, v in blob["state_dict"].items() if "fc." not in k})
    with pytest.raises(ValueError, match="missing 'fc.bias'"):
        load_imagenet_state_dict(ResNet50(), bad)


@pytest.mark.skipif(not check_int8_kernel(), reason="no exact oneDNN int8 convolution")
@pytest.mark.parametrize("arch, shape", [("mobilenet_v2_cifar", (3, 32, 32)),
                                         ("resnet50", (3, 64, 64))])  # fmt: skip
def test_int8_agrees_with_reference_on_new_blocks(arch, shape):
    torch.manual_seed(0)
    model = build(arch).eval()
    for m in model.modules():  # batch-norm statistics that are not the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.running_mean.uniform_(-0.2, 0.2)
    ref = QuantizedModel(model, torch.rand(16, *shape), 0.25, calibration="max")
    policy = uniform_policy(ref.layers, 6)
    ref.apply(policy)
    fast = copy.deepcopy(ref).set_backend("int8").apply(policy)
    depthwise = [s for s, layer in zip(fast._int8, ref.layers) if layer.depthwise]
    assert all(s is not None and s.active for s in depthwise)  # depthwise layers run in int8
    x = torch.rand(32, *shape) + 0.25 * torch.randn(32, *shape)
    with torch.no_grad():
        a, b = ref(x), fast(x)
    assert float((a.argmax(1) == b.argmax(1)).float().mean()) >= 0.96
