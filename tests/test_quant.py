"""Layer discovery and fake quantization (arq_gym.quant)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from arq_gym.models import build
from arq_gym.policy import Policy
from arq_gym.quant import (
    QuantizedModel,
    calibration_images,
    find_layers,
    quantize_weight,
)

# Hand computation of ResNet-20's MACs on a 32x32 input, per stage
# (conv MACs = 3*3 * c_in * c_out * h_out * w_out):
#   conv1 3->16 @32x32:                       9*3*16*1024            =    442,368
#   stage 1: 6 convs 16->16 @32x32:           6 * 9*16*16*1024       = 14,155,776
#   stage 2: 16->32 @16x16 + 5 x 32->32:      9*16*32*256 + 5*9*32*32*256
#                                            = 1,179,648 + 11,796,480 = 12,976,128
#   stage 3: 32->64 @8x8 + 5 x 64->64:        9*32*64*64 + 5*9*64*64*64
#                                            = 1,179,648 + 11,796,480 = 12,976,128
#   fc 64->10:                                                               640
#   total                                                              = 40,551,040
RESNET20_MACS = 40_551_040


@pytest.fixture(scope="module")
def resnet20():
    torch.manual_seed(0)
    return build("resnet20").eval()


def test_resnet20_layers_and_macs(resnet20):
    layers = find_layers(resnet20, torch.rand(2, 3, 32, 32))
    assert len(layers) == 20
    assert [lay.index for lay in layers] == list(range(20))
    assert layers[0].name == "conv1" and layers[0].c_in == 3 and layers[0].macs == 442_368
    assert layers[1].name == "layer1.0.conv1"
    assert layers[-1].name == "fc" and layers[-1].kind == "linear" and layers[-1].macs == 640
    assert sum(lay.kind == "conv" for lay in layers) == 19
    assert sum(lay.macs for lay in layers) == RESNET20_MACS
    first_stage3 = next(lay for lay in layers if lay.name == "layer3.0.conv1")
    assert (first_stage3.in_h, first_stage3.out_h, first_stage3.stride) == (16, 8, (2, 2))
    assert first_stage3.weights == 64 * 32 * 9
    assert not any(lay.depthwise for lay in layers)


def test_find_layers_restores_mode_and_buffers(resnet20):
    model = copy.deepcopy(resnet20).train()
    before = model.bn1.running_mean.clone()
    find_layers(model, torch.rand(4, 3, 32, 32))
    assert model.training
    assert torch.equal(model.bn1.running_mean, before)


class _Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)  # depthwise
        self.gc = nn.Conv2d(8, 16, (3, 1), groups=4)  # grouped, non-square kernel
        self.unused = nn.Linear(3, 3)
        self.head = nn.Linear(16 * 6 * 8, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.dw(x))
        return self.head(self.gc(x).flatten(1))


def test_grouped_and_depthwise_conv():
    layers = find_layers(_Grouped(), torch.rand(3, 3, 16, 16))
    assert [lay.name for lay in layers] == ["stem", "dw", "gc", "head"]  # unused left out
    stem, dw, gc, head = layers
    assert (stem.out_h, stem.out_w, stem.macs) == (8, 8, 9 * 3 * 8 * 64)
    assert dw.depthwise and dw.groups == 8 and dw.macs == 9 * 1 * 8 * 64
    assert dw.weights == 8 * 9
    assert not gc.depthwise and gc.groups == 4 and gc.kernel == (3, 1)
    assert (gc.in_h, gc.in_w, gc.out_h, gc.out_w) == (8, 8, 6, 8)
    assert gc.macs == 3 * 1 * (8 // 4) * 16 * 6 * 8
    assert head.kind == "linear" and head.macs == 16 * 48 * 5 and head.kernel == (1, 1)


def test_linear_only_model_and_shared_layer():
    shared = nn.Linear(6, 6)

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(10, 6)
            self.b = shared
            self.out = nn.Linear(6, 2)

        def forward(self, x):  # x: [N, T=4, 10]; b called twice
            return self.out(self.b(torch.relu(self.b(self.a(x)))))

    layers = find_layers(Mlp(), torch.rand(5, 4, 10))
    assert [lay.name for lay in layers] == ["a", "b", "out"]
    assert [lay.macs for lay in layers] == [10 * 6 * 4, 2 * 6 * 6 * 4, 6 * 2 * 4]
    assert all(lay.kind == "linear" and lay.in_h == 1 for lay in layers)


def test_model_without_quantizable_layer():
    model = nn.Sequential(nn.ReLU(), nn.Flatten())
    with pytest.raises(ValueError, match="no quantizable layer") as e:
        find_layers(model, torch.rand(2, 3))
    assert "\n" not in str(e.value)


@settings(max_examples=40, deadline=None)
@given(
    bits=st.integers(2, 8),
    c_out=st.integers(1, 6),
    fan_in=st.integers(1, 300),
    per_channel=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_weight_levels_per_channel(bits, c_out, fan_in, per_channel, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c_out, fan_in, generator=g) * torch.rand(c_out, 1, generator=g) * 3
    q = quantize_weight(w, bits, per_channel)
    assert q.shape == w.shape
    for row, orig in zip(q, w):
        assert row.unique().numel() <= 2**bits
        amax = (w.abs().max() if not per_channel else orig.abs().max()).item()
        step = amax / (2 ** (bits - 1) - 1)
        assert (row - orig).abs().max().item() <= step / 2 + 1e-5  # no clipping of weights
    # symmetric: -w quantizes to -q
    assert torch.allclose(quantize_weight(-w, bits, per_channel), -q)


@pytest.fixture(scope="module")
def calib():
    return torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def qmodel(resnet20, calib):
    return QuantizedModel(resnet20, calib, sigma=0.25, calibration="max")


def test_float_policy_is_exact_and_base_untouched(resnet20, qmodel):
    x = torch.rand(8, 3, 32, 32)
    base_w = resnet20.conv1.weight.clone()
    with torch.no_grad():
        ref = resnet20(x)
        qmodel.apply(Policy.uniform(20, 4, None))
        low = qmodel(x)
        qmodel.apply(Policy.uniform(20, 32, None))
        back = qmodel(x)
    assert torch.equal(back, ref)
    assert not torch.allclose(low, ref)
    assert torch.equal(resnet20.conv1.weight, base_w)
    assert qmodel.model is not resnet20


def test_apply_in_place_levels_and_activation_signs(qmodel):
    params = [p.data_ptr() for p in qmodel.parameters()]
    bits = [3, 4, 5, 6, 7, 8, 2] * 2 + [4, 4, 4, 5, 6, 8]
    qmodel.apply(Policy.from_bits(bits))
    assert [p.data_ptr() for p in qmodel.parameters()] == params  # no new model
    assert qmodel.policy == Policy.from_bits(bits)
    # first conv sees normalised noisy images (signed); every later layer follows a ReLU
    signs = [aq.signed for aq in qmodel.act_quant]
    assert signs[0] and not any(signs[1:])
    seen = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(i, args[0]))
        for i, m in enumerate(qmodel._targets)
    ]
    with torch.no_grad():
        qmodel(torch.rand(4, 3, 32, 32))
    for h in hooks:
        h.remove()
    for i, b in enumerate(bits):
        w = qmodel._targets[i].weight
        assert all(row.unique().numel() <= 2**b for row in w.reshape(w.shape[0], -1))
        # the pre-hook registered first (the quantizer) ran before the capture hook
        assert seen[i].unique().numel() <= 2**b
        if i > 0:
            assert seen[i].min() >= 0
    qmodel.apply(Policy.uniform(20, 32, None))


def test_deepcopy_keeps_quantizers_consistent(qmodel):
    qmodel.apply(Policy.uniform(20, 4, None))
    twin = copy.deepcopy(qmodel)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(twin(x), qmodel(x))
        twin.apply(Policy.uniform(20, 32, None))
        assert not torch.equal(twin(x), qmodel(x))
    assert qmodel.policy == Policy.uniform(20, 4, None)
    qmodel.apply(Policy.uniform(20, 32, None))


def test_calibration_is_deterministic_and_rules_differ():
    torch.manual_seed(0)
    model = _Grouped().eval()
    calib = torch.rand(32, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    a = QuantizedModel(model, calib, 0.25, calibration="mse")
    b = QuantizedModel(model, calib, 0.25, calibration="mse")
    c = QuantizedModel(model, calib, 0.25, calibration="max")
    p = QuantizedModel(model, calib, 0.25, calibration="percentile", percentile=99.0)
    assert [q.ranges for q in a.act_quant] == [q.ranges for q in b.act_quant]
    assert [q.signed for q in a.act_quant] == [True, False, False, True]  # gc has no ReLU after
    for qa, qc, qp in zip(a.act_quant, c.act_quant, p.act_quant):
        assert qa.ranges[2] < qa.ranges[8] <= qc.ranges[8] + 1e-6  # MSE clips more at low bits
        assert qp.ranges[4] < qc.ranges[4]
        assert len(set(qc.ranges.values())) == 1  # max and percentile: one range for all bits


@pytest.mark.parametrize(
    "policy, match",
    [
        (Policy.uniform(20, 9, None), r"layer 0 \(conv1\): w_bits = 9"),
        (Policy.uniform(20, 1, 8), r"layer 1 \(layer1.0.conv1\): w_bits = 1"),
        (Policy((8,) * 20, (8,) * 19 + (16,)), r"layer 19 \(fc\): a_bits = 16"),
        (Policy.uniform(19, 4), "policy has 19 layers but the model has 20"),
    ],
)
def test_bad_policies(qmodel, policy, match):
    with pytest.raises(ValueError, match=match) as e:
        qmodel.apply(policy)
    assert "\n" not in str(e.value)


def test_bad_constructor_arguments(resnet20, calib):
    with pytest.raises(ValueError, match="unknown calibration"):
        QuantizedModel(resnet20, calib, 0.25, calibration="minmax")
    with pytest.raises(ValueError, match="no quantizable layer"):
        QuantizedModel(nn.Sequential(nn.Flatten()), calib, 0.25)


def test_lenet5_real_accuracy(data_dir):
    """The shipped LeNet-5 (sigma 0.25): W8A8 within 0.5 points of float on noisy test images."""
    from arq_gym import data, models

    model, _ = models.load_shipped("lenet5", sigma=0.25)
    splits = data.load("fashion_mnist", data_dir)
    q = QuantizedModel(model, calibration_images(splits.train, 256), 0.25)
    x = torch.as_tensor(splits.test.x[:1000]).float() / 255
    x = x + 0.25 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    y = torch.as_tensor(splits.test.y[:1000])
    with torch.no_grad():
        fp = (model(x).argmax(1) == y).float().mean().item()
        q.apply(Policy.uniform(q.num_layers, 8, None))
        q8 = (q(x).argmax(1) == y).float().mean().item()
        q.apply(Policy.uniform(q.num_layers, 2, None))
        q2 = (q(x).argmax(1) == y).float().mean().item()
    assert fp > 0.8
    assert abs(q8 - fp) <= 0.005
    assert q2 < q8


def test_quantized_model_stays_in_eval_mode_after_certification(resnet20):
    """certify restores a module's training flag: a QuantizedModel must start in eval mode, or
    its batch norm would train (and move its running statistics) on the next forward pass."""
    from arq_gym.smoothing import certify

    qm = QuantizedModel(resnet20, torch.rand(16, 3, 32, 32), 0.25, calibration="max")
    assert not qm.training and not qm.model.training
    qm.apply(Policy.uniform(20, 4))
    x = torch.rand(4, 3, 32, 32)
    before = qm(x)
    certify(qm, x, np.zeros(4, dtype=np.int64), 0.25, n0=4, n=8, batch_size=8, progress=False)
    assert not qm.model.training
    assert torch.equal(qm(x), before)
