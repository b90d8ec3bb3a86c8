"""The FP32 network under torch.compile (arq_gym.models.compiled): agreement with eager PyTorch,
when it is used, the fallback, and what `arq-gym certify` reports."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from test_smoothing_certify import one_thread  # noqa: F401  (autouse: one torch thread)

from arq_gym.cli import main as cli_main
from arq_gym.models import build
from arq_gym.models.compiled import MIN_COMPILED_PASSES, CompiledNetwork, fp32_network


def _noisy(shape, batch=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((batch, *shape), generator=g)
    return x + 0.25 * torch.randn(x.shape, generator=g)


@pytest.mark.parametrize("arch,dataset,shape", [("lenet5", "fashion_mnist", (1, 28, 28)),
                                                ("mobilenet_v2_cifar", "cifar10", (3, 32, 32))])  # fmt: skip
def test_compiled_network_agrees_with_eager(arch, dataset, shape):
    """Batch norm folded, depthwise convolutions fused: the same logits up to float rounding,
    the same predictions, for full and partial batches (one graph, dynamic batch size)."""
    torch.manual_seed(0)
    model = build(arch, dataset).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics, so that folding has work to do
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    x = _noisy(shape)
    net = fp32_network(model, x)
    assert isinstance(net, CompiledNetwork) and net.function_id == "fp32-compiled"
    with torch.inference_mode():
        for batch in (x, x[:37]):  # a last, partial batch
            eager, fast = model(batch), net(batch)
            assert fast.shape == eager.shape
            assert torch.allclose(fast, eager, rtol=1e-3, atol=1e-4)
            assert torch.equal(fast.argmax(1), eager.argmax(1))


def test_eager_where_compiling_does_not_pay_or_is_not_asked_for():
    model = build("lenet5", "fashion_mnist").eval()
    x = _noisy((1, 28, 28), batch=4)
    assert fp32_network(model, x, "reference") is model
    assert fp32_network(model, x, forward_passes=MIN_COMPILED_PASSES - 1) is model
    with pytest.raises(ValueError, match="unknown FP32 backend 'int8'; choose auto or reference"):
        fp32_network(model, x, "int8")


def test_failed_compilation_warns_and_runs_eagerly(monkeypatch):
    def broken(module, **_kw):
        def run(_x):
            raise RuntimeError("no C++ compiler\nmore detail")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    model = build("lenet5", "fashion_mnist").eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net = fp32_network(model, _noisy((1, 28, 28), batch=4))
    assert net is model
    msgs = [str(w.message) for w in caught if w.category is RuntimeWarning]
    assert msgs == ["torch.compile failed (RuntimeError: no C++ compiler); "
                    "certifying the FP32 network eagerly"]  # fmt: skip


def test_certify_reports_the_compiled_function_and_the_same_certificate(capsys, data_dir):
    """A certification of 100,000 passes runs compiled; --backend reference runs eagerly; the
    certificates agree (the same noise, predictions and radii up to float rounding)."""
    base = ["certify", "--model", "lenet5", "--sigma", "0.25", "--split", "test", "--images", "4",
            "--n0", "100", "--n", str(MIN_COMPILED_PASSES // 4 - 100), "--device", "cpu",
            "--quiet", "--json", "--data-dir", str(data_dir)]  # fmt: skip
    results = {}
    for backend in ("auto", "reference"):
        assert cli_main([*base, "--backend", backend]) == 0
        results[backend] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    fast, eager = results["auto"], results["reference"]
    assert fast["function"] == "fp32-compiled" and eager["function"] == "fp32"
    assert fast["forward_passes"] == eager["forward_passes"] == MIN_COMPILED_PASSES
    assert fast["clean_accuracy"] == eager["clean_accuracy"]
    assert fast["acr"] == pytest.approx(eager["acr"], abs=1e-3)


def test_problem_compiles_its_fp32_network_once_for_large_certifications(data_dir, tmp_path):
    """What the IRS cache build, the table's FP32 row and a search's final certification use."""
    from arq_gym.problem import make_problem

    kw = {"model": "lenet5", "fidelity": "smoke", "keep_first_last": None, "data_dir": data_dir,
          "cache_dir": tmp_path}  # fmt: skip
    problem = make_problem(**kw, backend="auto")
    assert problem.fp32_network(MIN_COMPILED_PASSES - 1) is problem.model
    net = problem.fp32_network(MIN_COMPILED_PASSES)
    assert net.function_id == "fp32-compiled" and problem.fp32_network() is net
    reference = make_problem(**kw, backend="reference")
    assert reference.fp32_network(10**7) is reference.model
