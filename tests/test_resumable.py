"""Long certifications keep chunk checkpoints and announce their cost: the chunked IRS cache
build, chunked CERTIFY's callback and progress count, the final evaluation of a search (which
`arq-gym search`, `benchmark` and `table` run) and the first build of a problem's IRS cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from arq_gym.smoothing import build_irs_cache, certify
from arq_gym.smoothing import chunked as chunked_mod
from arq_gym.smoothing.chunked import (
    auto_chunk,
    build_irs_cache_chunked,
    certify_chunked,
    chunks_done,
    chunks_done_irs,
    format_duration,
    forward_passes,
)


class Stop(Exception):
    """Raised from a callback to interrupt a run between chunks."""


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3)).eval()
    images = torch.rand(7, 3, 4, 4)
    labels = np.array([0, 1, 2, 0, 1, 2, 0])
    keys = np.arange(7) * 3  # noise addresses other than 0..N-1
    return model, images, labels, keys


SETTINGS = dict(n0=10, n=60, alpha=0.01, seed=3, batch_size=32)


def test_cost_helpers():
    assert forward_passes(500, 100, 10_000) == 5_050_000
    assert auto_chunk(100, 10_000) == 24 and auto_chunk(100, 100_000) == 2
    assert auto_chunk(100, 1_000) == 25 and auto_chunk(100, 10**7) == 1
    assert format_duration(12) == "12 s" and format_duration(600) == "10 min"
    assert format_duration(3 * 3600 + 20 * 60) == "3 h 20 min"


def test_chunked_irs_cache_equals_one_build_and_resumes(tiny, tmp_path):
    model, images, labels, keys = tiny
    kw = dict(SETTINGS, n_p_max=20, checkpoint_sha256="c", data_sha256="d", num_classes=3,
              progress=False)  # fmt: skip
    whole = build_irs_cache(model, images, labels, 0.5, image_keys=keys, **kw)
    parts = tmp_path / "irs.parts"

    def stop_after_two(done, total):
        if done >= 6:
            raise Stop

    with pytest.raises(Stop):
        build_irs_cache_chunked(model, images, labels, 0.5, parts_dir=parts, chunk=3,
                                image_keys=keys, on_chunk=stop_after_two, **kw)  # fmt: skip
    assert sorted(p.name for p in parts.iterdir()) == ["000000.npz", "000003.npz"]
    assert chunks_done_irs(parts, keys, 3) == 6

    built = []
    real = chunked_mod.__dict__.get("_irs_parts")
    assert real is not None
    calls = []
    import arq_gym.smoothing.incremental as inc

    orig = inc.build_irs_cache

    def counting(*a, **k):
        calls.append(len(a[2]))
        return orig(*a, **k)

    inc.build_irs_cache = counting
    try:
        again = build_irs_cache_chunked(model, images, labels, 0.5, parts_dir=parts, chunk=3,
                                        image_keys=keys, on_chunk=lambda d, t: built.append(d),
                                        **kw)  # fmt: skip
    finally:
        inc.build_irs_cache = orig
    assert calls == [1]  # only the last chunk (one image) was certified again
    assert built == [3, 6, 7]
    for name in ("c_a", "pa_lower", "counts_a", "counts", "predictions", "labels", "image_keys"):
        np.testing.assert_array_equal(getattr(again, name), getattr(whole, name), err_msg=name)
    for key in ("images_sha256", "checkpoint_sha256", "data_sha256", "n", "n0", "n_p_max",
                "forward_passes", "num_classes", "noise"):  # fmt: skip
        assert again.meta[key] == whole.meta[key], key
    assert "chunk_ident" not in again.meta
    assert not again.mismatches({"checkpoint_sha256": "c", "data_sha256": "d", "n": 60})

    # a chunk built with other settings is not reused
    other = dict(kw, seed=4)
    calls.clear()
    inc.build_irs_cache = counting
    try:
        build_irs_cache_chunked(model, images, labels, 0.5, parts_dir=parts, chunk=3,
                                image_keys=keys, **other)  # fmt: skip
    finally:
        inc.build_irs_cache = orig
    assert calls == [3, 3, 1]


def test_certify_chunked_counts_finished_chunks(tiny, tmp_path):
    model, images, labels, keys = tiny
    ident = {"what": "tiny"}
    parts = tmp_path / "parts"
    with pytest.raises(Stop):
        certify_chunked(model, images, labels, 0.5, parts_dir=parts, ident=ident, chunk=2,
                        image_keys=keys, progress=False,
                        on_chunk=lambda d, t: (_ for _ in ()).throw(Stop) if d >= 4 else None,
                        **SETTINGS)  # fmt: skip
    assert chunks_done(parts, ident, 7, 2, keys) == 4
    assert chunks_done(parts, {"what": "other"}, 7, 2, keys) == 0
    cert = certify_chunked(model, images, labels, 0.5, parts_dir=parts, ident=ident, chunk=2,
                           image_keys=keys, progress=False, **SETTINGS)  # fmt: skip
    ref = certify(model, images, labels, 0.5, image_keys=keys, progress=False, **SETTINGS)
    np.testing.assert_array_equal(cert.radius, ref.radius)
    np.testing.assert_array_equal(cert.predict, ref.predict)


# ---------------------------------------------------------------------- with the real data

LENET = {"model": "lenet5", "dataset": "fashion_mnist", "keep_first_last": None,
         "fidelity": "smoke", "device": "cpu"}  # fmt: skip


def test_final_evaluation_resumes_from_its_chunks(data_dir, tmp_path, one_torch_thread, capsys,
                                                  monkeypatch):  # fmt: skip
    from arq_gym.experiments.search import final_evaluation
    from arq_gym.problem import make_problem

    problem = make_problem(**LENET, data_dir=data_dir, cache_dir=tmp_path / "cache")
    policy = ([4] * problem.num_layers, [4] * problem.num_layers)
    settings = dict(images=6, n=200, n0=20, data_dir=data_dir, progress=False, chunk=2)
    real = chunked_mod.certify
    calls = []
    armed = [True]

    def interrupting(*a, **k):
        calls.append(len(a[2]))
        if armed[0] and len(calls) == 3:  # the third chunk: two are saved, then Ctrl-C
            armed[0] = False
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(chunked_mod, "certify", interrupting)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        final_evaluation(problem, *policy, out=out, **settings)
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if x.startswith("final evaluation:")]
    assert len(line) == 1, err
    assert "best policy and the FP32 network on 6 test images" in line[0]
    assert f"{2 * 6 * 220:,} forward passes to go" in line[0]
    assert "images/s" in line[0] and "saved every 2 images" in line[0]
    assert len(list((out / "final.parts" / "quantized").glob("*.json"))) == 2

    calls.clear()
    doc = final_evaluation(problem, *policy, out=out, **settings)
    err = capsys.readouterr().err
    assert "4 of 6 images of the best policy already done" in err
    assert f"{(2 + 6) * 220:,} forward passes to go" in err
    assert calls == [2, 2, 2, 2]  # the quantized network's last chunk, then the FP32 network
    # same figures as one uninterrupted certification without chunks
    monkeypatch.setattr(chunked_mod, "certify", real)
    plain = final_evaluation(problem, *policy, out=None, announce=False,
                             **{**settings, "chunk": None})  # fmt: skip
    assert doc["quantized"]["acr"] == pytest.approx(plain["quantized"]["acr"], abs=0)
    assert doc["fp32"]["acr"] == pytest.approx(plain["fp32"]["acr"], abs=0)
    # the FP32 figures are cached: a third evaluation certifies the policy only
    calls.clear()
    monkeypatch.setattr(chunked_mod, "certify", interrupting)
    final_evaluation(problem, *policy, out=tmp_path / "run2", **settings)
    assert "of the best policy on 6 test images" in capsys.readouterr().err
    assert calls == [2, 2, 2]


def test_first_irs_build_is_announced_once(data_dir, tmp_path, one_torch_thread, capsys):
    from arq_gym.problem import make_problem

    kw = dict(LENET, images=4, n=300, n_p=50, data_dir=data_dir, cache_dir=tmp_path / "c")
    problem = make_problem(**kw)
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if "certifying the FP32" in x]
    assert len(lines) == 1, err
    assert "no shipped IRS cache fits" in lines[0]
    assert f"{4 * 400:,} forward passes" in lines[0] and "images/s measured here" in lines[0]
    assert str(problem.irs_cache_path) in lines[0]
    assert problem.irs_cache_path.is_file()
    assert not problem.irs_cache_path.with_name(problem.irs_cache_path.name + ".parts").exists()
    make_problem(**{**kw, "budget": 0.03})  # same IRS cache: nothing to certify, nothing said
    assert "certifying" not in capsys.readouterr().err
