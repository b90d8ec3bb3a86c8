"""`arq-gym certify` on the shipped LeNet-5 (Fashion-MNIST): full, incremental, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from test_smoothing_certify import one_thread  # noqa: F401  (autouse: one torch thread)

from arq_gym.cli import main as cli_main

BASE = [
    "certify",
    "--model",
    "lenet5",
    "--sigma",
    "0.25",
    "--split",
    "test",
    "--images",
    "4",
    "--n0",
    "10",
    "--n",
    "100",
    "--batch-size",
    "200",
    "--device",
    "cpu",
    "--quiet",
    "--json",
]


def _run(capsys, *argv):
    rc = cli_main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_certify_full_writes_tsv_and_json(tmp_path, capsys, data_dir):
    out = tmp_path / "res" / "lenet.tsv"
    rc, stdout, _err = _run(capsys, *BASE, "--data-dir", str(data_dir), "--out", str(out))
    assert rc == 0
    res = json.loads(stdout.strip().splitlines()[-1])
    for key in (
        "images",
        "clean_accuracy",
        "certified_accuracy",
        "acr",
        "abstain_rate",
        "bops_fraction",
        "seconds",
        "forward_passes",
    ):
        assert key in res
    assert res["images"] == 4 and res["forward_passes"] == 4 * 110 and res["bops_fraction"] == 1.0
    assert set(res["certified_accuracy"]) >= {"0.0", "0.25", "0.5", "0.75"}
    rows = out.read_text().splitlines()
    assert rows[0] == "idx\tlabel\tpredict\tradius\tcorrect\ttime"
    assert [r.split("\t")[0] for r in rows[1:]] == ["0", "2500", "5000", "7500"]
    assert json.loads(out.with_suffix(".json").read_text())["acr"] == pytest.approx(res["acr"])


def test_interrupted_full_certification_resumes_from_saved_chunks(tmp_path, capsys, data_dir,
                                                                   monkeypatch):  # fmt: skip
    import arq_gym.smoothing.chunked as chunked

    out = tmp_path / "fp.tsv"
    argv = [*BASE, "--data-dir", str(data_dir), "--out", str(out), "--chunk", "1"]
    rc, stdout, _ = _run(capsys, *argv)
    assert rc == 0 and not (tmp_path / "fp.tsv.parts").exists()  # removed once complete
    reference = json.loads(stdout.strip().splitlines()[-1])
    out.unlink()
    calls, original, stop_at = [], chunked.certify, [3]

    def interrupted(*args, **kwargs):
        calls.append(kwargs["image_keys"].tolist())
        if len(calls) == stop_at[0]:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(chunked, "certify", interrupted)
    rc, _out, _err = _run(capsys, *argv)
    assert rc == 130 and len(list((tmp_path / "fp.tsv.parts").iterdir())) == 2
    # another setting does not reuse the saved chunks of this one
    calls.clear()
    stop_at[0] = 0
    rc, _out, _err = _run(capsys, *argv, "--seed", "1")
    assert rc == 0 and len(calls) == 4
    # interrupted again, then resumed: only the images not yet certified are certified
    calls.clear()
    stop_at[0] = 3
    assert _run(capsys, *argv)[0] == 130
    calls.clear()
    stop_at[0] = 0
    rc, stdout, _ = _run(capsys, *argv)
    assert rc == 0 and calls == [[5000], [7500]]
    res = json.loads(stdout.strip().splitlines()[-1])
    assert res["acr"] == reference["acr"] and res["forward_passes"] == reference["forward_passes"]


def test_certify_incremental_builds_then_reuses_cache(tmp_path, capsys, data_dir):
    args = [
        *BASE,
        "--data-dir",
        str(data_dir),
        "--incremental",
        "--n-p",
        "50",
        "--cache-dir",
        str(tmp_path / "irs"),
    ]
    rc, stdout, _ = _run(capsys, *args)
    first = json.loads(stdout.strip().splitlines()[-1])
    assert rc == 0 and first["cache_built"] and first["mode"] == "incremental"
    assert len(list((tmp_path / "irs").glob("*.npz"))) == 1
    rc, stdout, _ = _run(capsys, *args)
    second = json.loads(stdout.strip().splitlines()[-1])
    assert rc == 0 and not second["cache_built"]
    assert second["acr"] == first["acr"] and second["forward_passes"] <= 4 * 50
    # another alpha needs another cache: built, not reused
    rc, stdout, _ = _run(capsys, *args, "--alpha", "0.01")
    assert rc == 0 and json.loads(stdout.strip().splitlines()[-1])["cache_built"]


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--n0", "200"], "--n0"),
        (["--alpha", "0.7"], "--alpha"),
        (["--images", "0"], "--images"),
        (["--images", "20000"], "exceeds"),
        (["--incremental", "--n-p", "500"], "--n-p"),
        (["--n-p", "5"], "--incremental"),
        (["--sigma", "0.3"], "sigma"),
        (["--checkpoint", "no/such/file.pt", "--sigma", "0.25"], "does not exist"),
    ],
)
def test_certify_bad_input_one_line_error(capsys, data_dir, extra, match):
    rc, _out, err = _run(capsys, *BASE, "--data-dir", str(data_dir), *extra)
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and match in err


def test_certify_uniform_bits_full_and_incremental(tmp_path, capsys, data_dir):
    pytest.importorskip("arq_gym.quant")
    common = [*BASE, "--data-dir", str(data_dir), "--uniform", "8", "--calib-images", "32"]
    rc, stdout, err = _run(capsys, *common)
    assert rc == 0, err
    res = json.loads(stdout.strip().splitlines()[-1])
    assert 0 < res["bops_fraction"] < 0.1 and res["network"] == "uniform W8A8"
    rc, stdout, err = _run(
        capsys, *common, "--incremental", "--n-p", "50", "--cache-dir", str(tmp_path / "irs")
    )
    assert rc == 0, err
    inc = json.loads(stdout.strip().splitlines()[-1])
    assert inc["mode"] == "incremental" and inc["bops_fraction"] == res["bops_fraction"]
    assert res["function"] == inc["function"] and res["function"].startswith(("int8", "fake"))
    # incremental against full certification of the same network at equal confidence
    rc, stdout, err = _run(capsys, *common, "--incremental", "--n-p", "50", "--compare-full",
                           "--cache-dir", str(tmp_path / "irs"))  # fmt: skip
    assert rc == 0, err
    cmp = json.loads(stdout.strip().splitlines()[-1])
    assert cmp["full"]["alpha"] == pytest.approx(0.001 + 0.001) and cmp["full"]["n"] == 100
    assert cmp["full"]["forward_passes"] == 4 * (10 + 100)  # n0 + n per image, from scratch
    assert cmp["speedup"] == pytest.approx(cmp["full"]["seconds"] / cmp["seconds"])
    assert cmp["acr"] == inc["acr"]  # the incremental result itself is unchanged
    rc, _out, err = _run(capsys, *common, "--compare-full")
    assert rc == 2 and "add --incremental" in err
    rc, _out, err = _run(capsys, *BASE, "--data-dir", str(data_dir), "--uniform", "1")
    assert rc == 2 and "bits" in err


def test_certify_policy_file(tmp_path, capsys, data_dir):
    pytest.importorskip("arq_gym.quant")
    import torch

    from arq_gym.models import load_shipped
    from arq_gym.policy import Policy, save_policy
    from arq_gym.quant import find_layers

    model, _meta = load_shipped("lenet5", sigma=0.25)
    layers = find_layers(model, torch.zeros(1, 1, 28, 28))
    policy = Policy.uniform(len(layers), 4)
    path = tmp_path / "p.json"
    save_policy(path, policy, layers, model="lenet5", dataset="fashion_mnist", sigma=0.25)
    rc, stdout, err = _run(
        capsys, *BASE, "--data-dir", str(data_dir), "--policy", str(path), "--calib-images", "32"
    )
    assert rc == 0, err
    res = json.loads(stdout.strip().splitlines()[-1])
    assert res["network"] == f"policy {path}" and 0 < res["bops_fraction"] < 0.05
    path.write_text("{}")
    rc, _out, err = _run(capsys, *BASE, "--data-dir", str(data_dir), "--policy", str(path))
    assert rc == 2 and "format" in err and len(err.strip().splitlines()) == 1


def test_certify_predict_reports_predict_accuracy(capsys, data_dir):
    """--predict: PREDICT on the same images, the same answers as the library call."""
    import numpy as np

    from arq_gym.data import load
    from arq_gym.models import load_shipped
    from arq_gym.smoothing import evenly_spaced, predict

    rc, stdout, _err = _run(capsys, *BASE, "--data-dir", str(data_dir), "--predict")
    assert rc == 0
    res = json.loads(stdout.strip().splitlines()[-1])["predict"]
    split = load("fashion_mnist", data_dir).split("test")
    idx = evenly_spaced(len(split), 4)
    sub = split.subset(idx)
    x = torch.from_numpy(np.ascontiguousarray(sub.x)).float() / 255.0
    model, _meta = load_shipped("lenet5", sigma=0.25)
    pred = predict(model.eval(), x, 0.25, n=100, alpha=0.001, batch_size=200, image_keys=idx,
                   progress=False)  # fmt: skip
    assert res["accuracy"] == float(np.mean(pred == sub.y))
    assert res["abstain_rate"] == float(np.mean(pred == -1))
    assert res["forward_passes"] == 400 and res["n"] == 100
    rc, _out, err = _run(capsys, *BASE, "--data-dir", str(data_dir), "--predict", "--incremental")
    assert rc != 0 and "--predict runs with full certification" in err


def test_certify_default_batch_is_100_on_cpu_and_changes_nothing(capsys, data_dir):
    """The CPU default batch (100) gives the same certificate as an explicit other batch size."""
    i = BASE.index("--batch-size")
    no_batch = BASE[:i] + BASE[i + 2 :]
    rc, stdout, _err = _run(capsys, *no_batch, "--data-dir", str(data_dir))
    assert rc == 0
    default = json.loads(stdout.strip().splitlines()[-1])
    rc, stdout, _err = _run(capsys, *BASE, "--data-dir", str(data_dir))
    explicit = json.loads(stdout.strip().splitlines()[-1])
    assert default["batch_size"] == 100 and explicit["batch_size"] == 200
    for key in ("clean_accuracy", "certified_accuracy", "acr", "abstain_rate", "forward_passes"):
        assert default[key] == explicit[key]


@pytest.mark.parametrize("n_p_max", [["--n-p-max", "100"], []])
def test_certify_incremental_finds_the_shipped_cache(tmp_path, capsys, data_dir, n_p_max):
    """The smoke-fidelity settings of the shipped LeNet-5 find its shipped IRS cache (which keeps
    n_p = 100 samples per image), also with the default --n-p-max (n, the size of a cache to
    build): nothing is built and the user's (empty) cache folder stays empty."""
    rc, stdout, _ = _run(
        capsys, "certify", "--model", "lenet5", "--sigma", "0.25", "--split", "val",
        "--images", "16", "--n", "1000", *n_p_max, "--incremental", "--n-p", "100",
        "--data-dir", str(data_dir), "--cache-dir", str(tmp_path / "irs"), "--quiet", "--json",
    )  # fmt: skip
    res = json.loads(stdout.strip().splitlines()[-1])
    assert rc == 0 and not res["cache_built"], res
    assert res["cache"].startswith("arq_gym/models/caches/"), res["cache"]
    assert not (tmp_path / "irs").exists() or not any((tmp_path / "irs").iterdir())
