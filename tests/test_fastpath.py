"""Fast execution paths of the quantized network (arq_gym.quant backends, bench-speed)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from arq_gym.models import build
from arq_gym.policy import Policy
from arq_gym.quant import (
    ActivationQuantizer,
    FoldedInt8Block,
    Int8Conv2d,
    QuantizedModel,
    check_int8_kernel,
    quantize_weight,
    uniform_policy,
    weight_integers,
)

needs_int8 = pytest.mark.skipif(not check_int8_kernel(), reason="no exact oneDNN int8 conv")


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_activation_quantizer_bit_identical_to_torch_fake_quantize(signed, bits):
    gen = torch.Generator().manual_seed(bits + 10 * signed)
    aq = ActivationQuantizer(signed, {b: 0.37 * b for b in range(2, 9)})
    aq.set_bits(bits)
    x = torch.randn(200_000, generator=gen) * aq.ranges[bits]
    # exact ties (k + 1/2) * scale and values far outside the range
    k = torch.randint(aq.qmin - 2, aq.qmax + 3, (20_000,), generator=gen).float()
    x[:20_000] = (k + 0.5) * aq.scale
    x[20_000:20_100] = 1e6
    ref = torch.fake_quantize_per_tensor_affine(x, aq.scale, aq.zero_point, aq.qmin, aq.qmax)
    ours = aq(x)
    assert torch.equal(ours, ref)  # equal values (+0.0 and -0.0 compare equal)
    codes = aq.quantize(x)
    assert torch.equal(codes * aq.scale, ref)
    assert codes.min() >= aq.qmin and codes.max() <= aq.qmax
    assert torch.equal(codes, codes.round())


def test_activation_quantizer_compiles_once_for_every_bit_width():
    """Bits live in buffers: a compiled graph serves 2-8 bits (LeNet's linear layers run the
    quantizer inside the compiled graph); only switching to float builds another."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    aq = ActivationQuantizer(False, {b: 0.37 * b for b in range(2, 9)})
    fn = torch.compile(lambda t: aq(t), dynamic=False)
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    for bits in (4, 5, 2, 8):
        aq.set_bits(bits)
        assert torch.equal(fn(x), aq(x))
    assert counters["stats"]["unique_graphs"] == 1
    aq.set_bits(32)
    assert torch.equal(fn(x), x)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("per_channel", [True, False])
def test_weight_integers_reproduce_fake_quantized_weight(bits, per_channel):
    w = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(bits))
    wq = quantize_weight(w, bits, per_channel)
    q, scale = weight_integers(wq, bits, per_channel)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 2 ** (bits - 1) - 1
    assert torch.equal(q.float() * scale.view(-1, 1, 1, 1), wq)


@needs_int8
@pytest.mark.parametrize("signed", [False, True])
def test_int8_conv_sums_exactly(signed):
    """The int8 layer's output is the exact integer convolution times s_a * s_w, rounded to
    float32 (a couple of ulps at most), on codes the reference quantizer produces."""
    gen = torch.Generator().manual_seed(1 + signed)
    conv = nn.Conv2d(32, 24, 3, stride=2, padding=1, bias=True)
    nn.init.normal_(conv.bias)
    fp_w = conv.weight.detach().clone()
    aq = ActivationQuantizer(signed, {b: 2.5 for b in range(2, 9)})
    aq.set_bits(8)
    with torch.no_grad():
        conv.weight.copy_(quantize_weight(fp_w, 8))
    layer = Int8Conv2d(conv, aq)
    layer.refresh(8, 8)
    x = torch.randn(6, 32, 12, 12, generator=gen) * 2.0
    if not signed:
        x = x.abs()
    out = layer(x)
    codes = aq.quantize(x)
    q, s_w = weight_integers(conv.weight, 8)
    acc = nn.functional.conv2d(codes.double(), q.double(), stride=2, padding=1)  # exact
    exact = acc * float(aq.scale) * s_w.double().view(1, -1, 1, 1)
    exact = exact + conv.bias.double().view(1, -1, 1, 1)
    tol = 4 * torch.finfo(torch.float32).eps * (exact.abs() + 1.0)
    assert out.dtype == torch.float32 and out.shape == exact.shape
    assert ((out.double() - exact).abs() <= tol).all()
    # and the fp32 reference (fake quantization) is an approximation of the same sums
    ref = conv(aq(x))
    assert torch.allclose(ref.double(), exact, rtol=1e-5, atol=1e-4)


@needs_int8
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_folded_int8_conv_writes_the_next_layers_codes(bits):
    """Int8Conv2d.fold: codes of relu(bn(conv)) for the next quantizer, from one oneDNN call.
    The integer sums are exact; only the float epilogue's rounding differs from the reference
    (batch norm, ReLU, then the quantizer), so a code may move by one at a rounding boundary,
    and rarely. Negative batch-norm gains (weights that change sign) are included."""
    gen = torch.Generator().manual_seed(bits)
    conv = nn.Conv2d(16, 24, 3, stride=1, padding=1, bias=False)
    bn = nn.BatchNorm2d(24).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.randn(24, generator=gen))  # about half negative
        bn.bias.copy_(torch.randn(24, generator=gen))
        bn.running_mean.copy_(torch.randn(24, generator=gen))
        bn.running_var.copy_(torch.rand(24, generator=gen) + 0.5)
        conv.weight.copy_(quantize_weight(conv.weight, bits))
    aq = ActivationQuantizer(False, {b: 3.0 for b in range(2, 9)})
    aq.set_bits(bits)
    nxt = ActivationQuantizer(False, {b: 2.0 for b in range(2, 9)})
    nxt.set_bits(bits)
    layer = Int8Conv2d(conv, aq)
    layer.refresh(bits, bits)
    layer.fold(bn, nxt)
    assert (bn.weight < 0).any()
    x = (torch.randn(8, 16, 10, 10, generator=gen) * 2.0).abs()
    codes = layer.codes(x)
    with torch.inference_mode():
        out = layer.conv_codes_folded(codes)
        expected = nxt.quantize(torch.relu(bn(layer.conv_codes(codes))))
    assert out.dtype == torch.uint8 and out.shape == expected.shape
    diff = (out.float() - expected).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-3
    assert int(out.max()) <= nxt.qmax and int(out.max()) > 0  # clipped to the next bits
    with pytest.raises(ValueError, match="unsigned next quantizer"):
        layer.fold(bn, ActivationQuantizer(True, {b: 2.0 for b in range(2, 9)}))


@pytest.fixture(scope="module")
def resnet_q():
    torch.manual_seed(0)
    model = build("resnet20").eval()
    # give batch norm realistic statistics so activations are not all tiny
    with torch.no_grad():
        model.train()
        for _ in range(3):
            model(torch.rand(64, 3, 32, 32))
        model.eval()
    return QuantizedModel(model, torch.rand(32, 3, 32, 32), 0.25, calibration="max")


MIXED = Policy((8,) + (3, 5, 6, 2, 7) * 3 + (4, 3, 8, 8), (8,) + (5, 3, 2, 6, 4) * 3 + (8, 6, 8, 8))


@needs_int8
@pytest.mark.parametrize("policy", ["w4a4", "mixed"])
def test_int8_backend_agrees_with_reference(resnet_q, policy):
    pol = uniform_policy(resnet_q.layers, 4) if policy == "w4a4" else MIXED
    ref_model = copy.deepcopy(resnet_q).apply(pol)
    fast = copy.deepcopy(resnet_q).set_backend("int8").apply(pol)
    assert fast.backend == "int8" and fast.function_id == "int8-exact-sums-folded"
    # every basic block has both convs in int8, so all nine are folded
    assert sum(isinstance(m, FoldedInt8Block) for m in fast.model.modules()) == 9
    assert ref_model.function_id == "fake-quant-fp32"
    gen = torch.Generator().manual_seed(3)
    agree = total = 0
    with torch.inference_mode():
        for _ in range(3):
            x = torch.rand(100, 3, 32, 32, generator=gen)
            x = x + 0.25 * torch.randn(x.shape, generator=gen)
            a, b = ref_model(x), fast(x)
            agree += int((a.argmax(1) == b.argmax(1)).sum())
            total += len(x)
            assert (a - b).abs().max() < 0.1 * a.abs().max() + 1e-3
    assert agree / total >= 0.98


@needs_int8
def test_backend_switch_restores_reference_exactly(resnet_q):
    qm = copy.deepcopy(resnet_q).apply(MIXED)
    x = torch.rand(16, 3, 32, 32)
    with torch.inference_mode():
        before = qm(x)
        qm.set_backend("int8")
        assert any(isinstance(m, Int8Conv2d) for m in qm.model.modules())
        qm.apply(uniform_policy(qm.layers, 4)).apply(MIXED)  # re-packs, then back
        qm.set_backend("reference")
        assert not any(isinstance(m, (Int8Conv2d, FoldedInt8Block)) for m in qm.model.modules())
        assert torch.equal(qm(x), before)
        # a block with a float conv is not folded; the others are
        one_float = Policy(MIXED.w_bits[:3] + (32,) + MIXED.w_bits[4:], MIXED.a_bits)
        qm.set_backend("int8").apply(one_float)  # layer 3 = layer1.1.conv1
        folded = [m for m in qm.model.modules() if isinstance(m, FoldedInt8Block)]
        assert len(folded) == 8 and not isinstance(qm.model.layer1[1], FoldedInt8Block)
        # the float policy through the int8 backend is the float network
        qm.apply(Policy.uniform(qm.num_layers, 32, None))
        assert not any(isinstance(m, FoldedInt8Block) for m in qm.model.modules())
        assert torch.equal(qm(x), qm.model(x))


@needs_int8
def test_folding_can_be_turned_off_and_agrees(resnet_q):
    folded = copy.deepcopy(resnet_q).set_backend("int8").apply(MIXED)
    plain = copy.deepcopy(folded).set_folding(False)
    assert plain.function_id == "int8-exact-sums" and folded.function_id.endswith("-folded")
    assert not any(isinstance(m, FoldedInt8Block) for m in plain.model.modules())
    x = torch.rand(200, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        a, b = folded(x), plain(x)
    assert not torch.equal(a, b)  # a different float epilogue...
    assert (a.argmax(1) == b.argmax(1)).float().mean() >= 0.98  # ...for the same network
    plain.set_folding(True)
    with torch.inference_mode():
        assert torch.equal(plain(x), a)


@needs_int8
def test_folded_blocks_match_their_blocks_and_stay_channels_last(resnet_q):
    qm = copy.deepcopy(resnet_q).set_backend("int8").apply(MIXED)
    blocks = [m for m in qm.model.modules() if isinstance(m, FoldedInt8Block)]
    x = torch.rand(20, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        h = qm.model.bn1(qm.model.conv1(x)).relu()
        for folded in blocks:  # identity and option-A (downsampling) shortcuts alike
            out, ref = folded(h), folded.block(h)
            assert out.shape == ref.shape
            # the residual stream keeps the convolutions' layout (no transposes when compiled)
            assert out.is_contiguous(memory_format=torch.channels_last)
            assert (out - ref).abs().max() <= 0.05 * ref.abs().max()
            h = ref


@needs_int8
def test_int8_copies_are_independent(resnet_q):
    a = copy.deepcopy(resnet_q).set_backend("int8").apply(MIXED)
    b = copy.deepcopy(a)
    x = torch.rand(8, 3, 32, 32)
    with torch.inference_mode():
        out_a = a(x)
        assert torch.equal(b(x), out_a)
        b.apply(uniform_policy(b.layers, 2))
        assert torch.equal(a(x), out_a)  # changing the copy leaves the original alone


def test_bad_backend_is_one_clear_error(resnet_q):
    with pytest.raises(ValueError, match="unknown backend"):
        copy.deepcopy(resnet_q).set_backend("int4")


@needs_int8
def test_compiled_int8_agrees_and_compiles_once_for_all_policies_and_batches(resnet_q):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    qm = copy.deepcopy(resnet_q).set_backend("int8-compiled").apply(MIXED)
    assert qm.compiled and qm.function_id == "int8-exact-sums-folded-compiled"
    eager = copy.deepcopy(resnet_q).set_backend("int8").apply(MIXED)
    assert not eager.compiled and eager.function_id == "int8-exact-sums-folded"
    x = torch.rand(64, 3, 32, 32) + 0.25 * torch.randn(64, 3, 32, 32)
    assert eager.warmed_up and not qm.warmed_up  # eager: nothing to build
    qm.warm_up(x)
    assert qm.warmed_up
    with torch.inference_mode():
        for pol, batch in ((MIXED, 64), (uniform_policy(qm.layers, 4), 64), (MIXED, 37)):
            qm.apply(pol)
            eager.apply(pol)
            xb = x[:batch].clone()
            a, b = qm(xb), eager(xb)
            assert (a.argmax(1) == b.argmax(1)).float().mean() >= 0.95
    # another copy of the model, another policy: its own weights, through the same graph
    other = copy.deepcopy(resnet_q).set_backend("int8-compiled").apply(uniform_policy(qm.layers, 3))
    other_eager = copy.deepcopy(resnet_q).set_backend("int8").apply(uniform_policy(qm.layers, 3))
    qm.apply(MIXED)
    with torch.inference_mode():
        xb = x.clone()
        a, b, c = other(xb), other_eager(xb), qm(xb)
    assert (a.argmax(1) == b.argmax(1)).float().mean() >= 0.95
    assert not torch.allclose(a, c)  # not the first copy's weights
    # one graph for every policy within 2-8 bits, every batch size (dynamic batch dim) and
    # every copy of the model (the layer key is a tensor, not a compile-time constant)
    assert counters["stats"]["unique_graphs"] == 1


@needs_int8
def test_warm_up_falls_back_to_eager_int8_when_compilation_fails(resnet_q, monkeypatch):
    def broken_compile(model, **kwargs):
        def run(x):
            raise RuntimeError("no C++ compiler\nsecond line")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    qm = copy.deepcopy(resnet_q).set_backend("int8-compiled").apply(MIXED)
    with pytest.warns(RuntimeWarning, match="torch.compile failed .*no C\\+\\+ compiler"):
        qm.warm_up(torch.rand(4, 3, 32, 32))
    assert not qm.compiled and qm.function_id == "int8-exact-sums-folded" and qm.warmed_up
    qm.compile(dynamic=True)
    assert not qm.warmed_up  # a new graph to build
    qm.uncompile()
    with torch.inference_mode():
        assert qm(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_bench_speed_quick_json(tmp_path, capsys, data_dir):
    from arq_gym.cli import main

    rc = main(["bench-speed", "--quick", "--json", "--no-progress", "--images", "2",
               "--cache-dir", str(tmp_path), "--data-dir", str(data_dir)])  # fmt: skip
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("policy_seconds", "naive_seconds", "speedup", "samples_per_second",
                "limit_fraction", "peak", "flops_per_sample", "agreement"):  # fmt: skip
        assert key in res
    assert res["flops_per_sample"] == 2 * 40_551_040
    assert res["peak"]["fp32_gflops"] > 0
    assert res["samples_per_second"]["fp32-reference"]["w4a4"] > 0
    assert res["speedup"] == pytest.approx(res["naive_seconds"] / res["policy_seconds"], rel=0.02)
    if check_int8_kernel():
        assert res["agreement"]["int8"]["samples"] >= 400
        assert res["reference_irs"]["identical_certificate"] in (True, False)
        tb = res["time_breakdown"]
        assert tb["path"] == "int8" and 0 < tb["int8_conv_share"] < 1  # --quick: no compile
        # (--quick measures the peak on small matrices, so fractions are not compared here)
        assert tb["int8_conv_limit_fraction"] > 0 and res["limit_fraction"] > 0
    onnx_row = res["onnxruntime"]
    if "skipped" not in onnx_row:  # with the [onnx] extra: the exported W4A4 and mixed graphs
        assert onnx_row["function"] == "onnxruntime-qdq" and onnx_row["best_samples_per_second"] > 0
        assert onnx_row["agreement"]["samples"] >= 400
        assert onnx_row["agreement"]["disagreements"] <= 4  # the same networks up to rounding


def test_bench_speed_rejects_bad_input(capsys):
    from arq_gym.cli import main

    assert main(["bench-speed", "--quick", "--threads", "0"]) == 2
    assert "threads" in capsys.readouterr().err


def test_bench_speed_models_measures_depthwise_networks_and_extrapolates(capsys):
    """``--models``: MobileNetV2 for CIFAR (17 depthwise layers) measured on every path, with the
    search fidelity extrapolated from the measured throughput and pipeline overhead."""
    from arq_gym.cli import main

    rc = main(["bench-speed", "--models", "mobilenet_v2_cifar", "--quick", "--json",
               "--no-progress"])  # fmt: skip
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    row = res["models"]["mobilenet_v2_cifar"]
    assert row["layers"] == 53 and row["depthwise_layers"] == 17 and row["input"] == [3, 32, 32]
    assert row["flops_per_sample"] > 0 and row["samples_per_second"]["fp32-reference"] > 0
    ext, red = row["search_extrapolated"], row["reduced"]
    assert ext["episode_forward_passes"] == 100 * 500
    rate = row["samples_per_second"][row["fastest_path"]]
    assert ext["episode_seconds"] == pytest.approx(
        50_000 / rate * red["overhead_over_forward_time"], rel=0.01)
    assert red["policy_forward_passes"] == red["images"] * (red["n0"] + red["n"])
    if check_int8_kernel():
        assert row["agreement"]["int8"]["disagreements"] <= row["agreement"]["int8"]["samples"]
    # the FP32 cache is extrapolated from the faster float path (compiled where it compiles)
    floats = {k: v for k, v in row["samples_per_second"].items() if k in ("fp32", "fp32-compiled")}
    assert "fp32-compiled" in floats or "fp32-compiled" in row["skipped_paths"]
    assert ext["fp_cache_hours"] == pytest.approx(
        ext["fp_cache_forward_passes"] / max(floats.values()) / 3600, abs=0.006)
    if "fp32-compiled" in floats:
        agree = row["agreement"]["fp32-compiled"]
        assert agree["disagreements"] <= 0.01 * agree["samples"]
    assert res["gpu"].startswith("not measured") or res["gpu"].startswith("measured")
    assert main(["bench-speed", "--models", "vgg16", "--quick"]) == 2
    assert "unknown architecture 'vgg16'" in capsys.readouterr().err
