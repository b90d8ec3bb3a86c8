"""The deployable integer model: ONNX export with QDQ operators, ONNX Runtime, certify --onnx."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from arq_gym.cli import main  # noqa: E402
from arq_gym.deploy import OnnxClassifier, agreement, export_onnx, read_metadata  # noqa: E402
from arq_gym.models import load_shipped  # noqa: E402
from arq_gym.policy import Policy  # noqa: E402
from arq_gym.quant import QuantizedModel  # noqa: E402

SIGMA = 0.25
MIXED = Policy((8, 4, 3, 5, 8), (8, 3, 4, 2, 6))  # LeNet-5, every bit-width from 2 to 8


@pytest.fixture(scope="module")
def lenet():
    return load_shipped("lenet5", "fashion_mnist", SIGMA)


@pytest.fixture(scope="module")
def calib():
    return torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def test_mixed_bits_round_trip_through_onnx_runtime(lenet, calib, tmp_path):
    model, meta = lenet
    path = tmp_path / "lenet.onnx"
    props = export_onnx(model, meta, MIXED, calib, path)
    reference = QuantizedModel(model, calib, SIGMA, seed=0).apply(MIXED)
    runtime = OnnxClassifier(path, threads=1)
    assert runtime.function_id == "onnxruntime-qdq" and runtime.policy == MIXED
    x = torch.rand(256, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (reference(x) - runtime(x)).abs().max()
    assert float(diff) < 1e-4  # the same quantized network up to float rounding
    res = agreement(reference, runtime, x, SIGMA, 3000)
    assert res["disagreements"] <= 3, res
    assert props["arq.checkpoint_sha256"] == meta["sha256"] and float(props["arq.sigma"]) == SIGMA


def test_graph_holds_integer_weights_and_qdq_and_passes_the_checker(lenet, calib, tmp_path):
    model, meta = lenet
    path = tmp_path / "lenet.onnx"
    export_onnx(model, meta, MIXED, calib, path)
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("QuantizeLinear") == 5 and ops.count("DequantizeLinear") == 10
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.graph.initializer}
    codes = [v for k, v in inits.items() if v.dtype == np.int8 and v.ndim >= 2]
    assert len(codes) == 5  # one integer weight tensor per layer
    limits = sorted(int(np.abs(c).max()) for c in codes)
    assert limits == sorted(2 ** (b - 1) - 1 for b in MIXED.w_bits)  # on their 2^b - 1 levels
    meta_props = read_metadata(path)
    assert json.loads(meta_props["arq.policy"])["a_bits"] == list(MIXED.a_bits)
    assert meta_props["arq.model"] == "lenet5"


def test_export_command_errors_are_one_line(tmp_path, data_dir, capsys):
    bad = tmp_path / "policy.json"
    layers = [{"name": f"layer{i}", "w_bits": 4, "a_bits": 4, "macs": 1} for i in range(20)]
    bad.write_text(json.dumps({"format": "arq-policy/1", "layers": layers}))
    code = main(["export", "--model", "lenet5", "--policy", str(bad), "--out",
                 str(tmp_path / "x.onnx"), "--data-dir", str(data_dir)])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "20 layers but the model has 5" in err[0]
    assert not (tmp_path / "x.onnx").exists()
    not_onnx = tmp_path / "no.onnx"
    not_onnx.write_bytes(b"nothing")
    assert main(["certify", "--onnx", str(not_onnx), "--data-dir", str(data_dir)]) == 2
    assert "not an ONNX model" in capsys.readouterr().err


def test_certify_onnx_equals_certify_policy(tmp_path, data_dir, capsys):
    out = tmp_path / "w4.onnx"
    common = ["--split", "val", "--images", "12", "--n0", "20", "--n", "200", "--quiet",
              "--json", "--data-dir", str(data_dir)]  # fmt: skip
    assert main(["export", "--model", "lenet5", "--uniform", "4", "--out", str(out),
                 "--check", "1000", "--json", "--data-dir", str(data_dir)]) == 0  # fmt: skip
    exported = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert exported["check"]["disagreements"] <= 2
    assert main(["certify", "--onnx", str(out), *common]) == 0
    via_onnx = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["certify", "--model", "lenet5", "--uniform", "4", "--backend", "reference",
                 *common]) == 0  # fmt: skip
    via_ref = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert via_onnx["function"] == "onnxruntime-qdq"
    assert via_onnx["acr"] == pytest.approx(via_ref["acr"], abs=1e-9)
    assert via_onnx["certified_accuracy"] == via_ref["certified_accuracy"]
    assert via_onnx["bops_fraction"] == pytest.approx(via_ref["bops_fraction"])


def test_quantized_checkpoint_exports_with_its_policy(lenet, tmp_path, data_dir):
    from arq_gym.data import load
    from arq_gym.finetune import FinetuneConfig, finetune
    from arq_gym.models import load_checkpoint
    from arq_gym.quant import calibration_images

    model, meta = lenet
    splits = load("fashion_mnist", data_dir)
    finetune(model, meta, MIXED, tmp_path / "ft", FinetuneConfig(epochs=1, train_images=500,
             val_images=100), splits=splits, progress=False, tensorboard=False)  # fmt: skip
    ft, ft_meta = load_checkpoint(tmp_path / "ft" / "model.pt")
    calib = calibration_images(splits.train, 512, seed=0)
    path = tmp_path / "ft.onnx"
    props = export_onnx(ft, ft_meta, None, calib, path)
    assert props["arq.parent_sha256"] == meta["sha256"]
    reference = QuantizedModel(ft, calib, SIGMA, seed=0, quantization=ft_meta["quantization"])
    reference.apply(MIXED)
    x = torch.from_numpy(splits.val.x[:300]).float() / 255.0
    assert agreement(reference, OnnxClassifier(path), x, SIGMA, 1500)["disagreements"] <= 3
    from arq_gym.deploy import OnnxExportError

    with pytest.raises(OnnxExportError, match="own policy"):
        export_onnx(ft, ft_meta, Policy.uniform(5, 4, None), calib, tmp_path / "y.onnx")
