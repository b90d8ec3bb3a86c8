"""``arq-gym table``: the paper-style results table, chunked resumable certification, bad input."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from arq_gym.cli import main
from arq_gym.experiments import table as table_mod
from arq_gym.experiments.search import SearchError, search
from arq_gym.smoothing import certify

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = dict(env_kwargs={"fidelity": "smoke"}, episodes=2, images=6, n=100, n0=10, chunk=4,
             progress=False)  # fmt: skip


def test_table_rows_columns_and_test_images(tmp_path, data_dir, capsys):
    out = tmp_path / "table"
    argv = ["table", "--env", "ARQ-LeNet5-v0", "--rows", "fp32,w4a4,arq,random", "--episodes", "2",
            "--images", "6", "--n", "100", "--n0", "10", "--chunk", "4", "--out", str(out),
            "--env-kwargs", "fidelity=smoke", f"data_dir={data_dir}", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    said = [x for x in capsys.readouterr().err.splitlines() if x.startswith("table row ")]
    assert [x.split(":")[0] for x in said] == [f"table row {r}" for r in ("fp32", "w4a4", "arq",
                                                                           "random")]  # fmt: skip
    assert all(f"{6 * 110:,} forward passes to go" in x and "saved every 4 images" in x
               for x in said)  # fmt: skip
    res = json.loads((out / "results.json").read_text())
    assert [r["row"] for r in res["rows"]] == ["fp32", "w4a4", "arq", "random"]
    with open(out / "table.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == table_mod.CSV_FIELDS and len(rows) == 4
    fp, w4 = res["rows"][0], res["rows"][1]
    assert fp["bops_percent"] == 100.0 and fp["function"] == "fp32"
    assert fp["acr_percent_of_fp32"] == 100.0
    assert w4["acr_percent_of_fp32"] == pytest.approx(100 * w4["acr"] / fp["acr"])
    assert w4["bops_percent"] == pytest.approx(100 / 64)  # LeNet: every layer at 4 bits
    assert res["rows"][2]["search_episodes"] == 2 and res["rows"][2]["reward_name"] == "acr"
    md = (out / "table.md").read_text()
    for text in ("| method | clean acc. | cert. acc. r=0.25 | r=0.5 | r=0.75 | ACR [95% interval] "
                 "| ACR (% of FP32) | ACR - FP32 [95% interval] | BOPs (% of FP32) | training |",
                 "| FP32 |", "| uniform W4A4 |", "| ARQ search (reward acr) |",
                 "Command: `arq-gym table --env ARQ-LeNet5-v0", "Machine:", "6 test images"):
        assert text in md, text
    # certified on the test images every 10000 // 6-th, never on the validation subset
    cert = json.loads((out / "certs" / "fp32.json").read_text())["certificate"]
    assert cert["idx"] == [i * (10_000 // 6) for i in range(6)]
    tsv = (out / "certs" / "w4a4.tsv").read_text().splitlines()
    assert tsv[0] == "idx\tlabel\tpredict\tradius\tcorrect\ttime" and len(tsv) == 7
    assert not (out / "certs" / "fp32.parts").exists()  # chunks are removed once a row is done


def test_chunked_certification_equals_one_pass(tmp_path, data_dir):
    import gymnasium as gym

    from arq_gym.smoothing import certify_chunked

    env = gym.make("ARQ-LeNet5-v0", fidelity="smoke", data_dir=str(data_dir))
    problem = env.unwrapped.problem
    x, y, idx, _stride = table_mod._test_images(problem, 6, str(data_dir))
    kw = dict(n0=10, n=100, alpha=0.001, batch_size=problem.batch_size, seed=problem.seed,
              num_classes=problem.num_classes)  # fmt: skip
    chunked = certify_chunked(problem.model, x, y, problem.sigma, parts_dir=tmp_path / "parts",
                              ident={"k": 1}, chunk=4, image_keys=idx, progress=False, **kw)
    with torch.inference_mode():
        whole = certify(problem.model, x, y, problem.sigma, image_keys=idx, progress=False, **kw)
    for name in ("idx", "predict", "radius", "pa_lower"):
        assert np.array_equal(getattr(chunked, name), getattr(whole, name)), name
    assert chunked.forward_passes == whole.forward_passes
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == ["000000.json", "000004.json"]


def test_interrupted_table_resumes_without_repeating_work(tmp_path, data_dir, monkeypatch):
    out = tmp_path / "table"
    kw = dict(SMALL, env_kwargs={"fidelity": "smoke", "data_dir": str(data_dir)},
              rows="fp32,random")  # fmt: skip
    import arq_gym.smoothing.chunked as smoothing  # where the chunks call certify

    calls = []
    original = smoothing.certify

    def flaky(*args, **kwargs):
        calls.append(len(args[2]))
        if len(calls) == 4:  # fp32: 2 chunks; random: first chunk done, second interrupted
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(smoothing, "certify", flaky)
    with pytest.raises(KeyboardInterrupt):
        table_mod.results_table("ARQ-LeNet5-v0", out, **kw)
    assert (out / "certs" / "fp32.json").is_file() and not (out / "certs" / "random.json").exists()
    assert len(list((out / "certs" / "random.parts").iterdir())) == 1
    with pytest.raises(SearchError, match="pass --resume"):
        table_mod.results_table("ARQ-LeNet5-v0", out, **kw)
    calls.clear()
    res = table_mod.results_table("ARQ-LeNet5-v0", out, resume=True, **kw)
    assert calls == [2]  # only the unfinished chunk of the random row: 6 images, chunks of 4
    assert [r["row"] for r in res["rows"]] == ["fp32", "random"]
    state = json.loads((out / "searches" / "random" / "search.json").read_text())
    assert state["episodes"] == 2  # the finished search was not run again
    with pytest.raises(SearchError, match="episodes=2, not 3"):
        table_mod.results_table("ARQ-LeNet5-v0", out, resume=True, **(kw | {"episodes": 3}))
    # a table of another base model (the shipped one changed) is never resumed into a mixture
    meta = json.loads((out / "table.json").read_text())
    assert meta["checkpoint_sha256"] == table_mod.recorded_base_model(out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for where in ("table.json", "searches"):  # tables written before table.json recorded it too
        if where == "searches":
            del meta["checkpoint_sha256"]
            run = out / "searches" / "random" / "run.json"
            doc = json.loads(run.read_text())
            doc["problem"]["checkpoint_sha256"] = "0" * 64
            run.write_text(json.dumps(doc))
        else:
            meta["checkpoint_sha256"] = "0" * 64
        (out / "table.json").write_text(json.dumps(meta))
        with pytest.raises(SearchError, match="base model 0000000000000000..., but the env now"):
            table_mod.results_table("ARQ-LeNet5-v0", out, resume=True, **kw)
    # and a search resumed on another base model says so
    with pytest.raises(SearchError, match="searched on the base model 0000000000000000"):
        search(**{**table_mod._row_searches(table_mod.parse_rows("random"),
                                                      "ARQ-LeNet5-v0", kw["env_kwargs"], None,
                                                      2, 0, out)[0]["search"]})  # fmt: skip
    assert {p for p in out.rglob("*") if p.is_file()} == set(before)


def test_bad_table_input_is_one_clear_error(tmp_path, data_dir):
    kw = dict(SMALL, env_kwargs={"fidelity": "smoke", "data_dir": str(data_dir)})
    with pytest.raises(SearchError, match="unknown row 'nope'"):
        table_mod.results_table("ARQ-LeNet5-v0", tmp_path / "a", rows="fp32,nope", **SMALL)
    with pytest.raises(SearchError, match="rows choose the reward"):
        table_mod.results_table("ARQ-LeNet5-v0", tmp_path / "b",
                                **(kw | {"env_kwargs": {"reward": "acr"}}))  # fmt: skip
    with pytest.raises(SearchError, match="--images must be a positive integer"):
        table_mod.results_table("ARQ-LeNet5-v0", tmp_path / "c", **(kw | {"images": 0}))
    with pytest.raises(SearchError, match="exceeds the 10000 test images"):
        table_mod.results_table("ARQ-LeNet5-v0", tmp_path / "d", rows="fp32",
                                **(kw | {"images": 10_001}))  # fmt: skip
    for name in "abcd":
        assert not (tmp_path / name).exists(), name


def test_finetuned_rows_and_nipq_row(tmp_path, data_dir):
    """--finetune-epochs adds <row>+ft rows certified through their quantized checkpoints, and
    the nipq row trains with the same budget; every row has an ACR interval."""
    out = tmp_path / "table"
    kw = dict(SMALL, env_kwargs={"fidelity": "smoke", "data_dir": str(data_dir)})
    ft_kw = {"train_images": 1000, "val_images": 200}
    res = table_mod.results_table("ARQ-LeNet5-v0", out, rows="fp32,w4a4,nipq", finetune_epochs=2,
                                  finetune_kwargs=ft_kw, **kw)  # fmt: skip
    rows = {r["row"]: r for r in res["rows"]}
    assert list(rows) == ["fp32", "w4a4", "w4a4+ft", "nipq"]
    ft, w4, nq = rows["w4a4+ft"], rows["w4a4"], rows["nipq"]
    assert ft["w_bits"] == w4["w_bits"] and ft["train_epochs"] == 2 and ft["train_seconds"] > 0
    assert nq["train_epochs"] == 2 and nq["bops_percent"] <= 100 / 64 + 1e-9
    assert len(nq["learned_w_bits"]) == 5
    ident = json.loads((out / "certs" / "w4a4+ft.json").read_text())["ident"]
    assert ident["checkpoint_sha256"] != json.loads(
        (out / "certs" / "w4a4.json").read_text())["ident"]["checkpoint_sha256"]  # fmt: skip
    assert (out / "finetune" / "w4a4" / "model.pt").is_file()
    for r in res["rows"]:
        assert r["acr_low"] <= r["acr"] <= r["acr_high"]
        assert r["acr_minus_fp32_low"] <= r["acr_minus_fp32"] <= r["acr_minus_fp32_high"]
    assert rows["fp32"]["acr_minus_fp32"] == 0
    md = (out / "table.md").read_text()
    assert "fine-tuned 2 ep." in md and "| NIPQ (learned bits) |" in md and "learned bits" in md
    # resumed: nothing is trained or certified again
    stamp = (out / "finetune" / "w4a4" / "finetune.json").stat().st_mtime_ns
    again = table_mod.results_table("ARQ-LeNet5-v0", out, rows="fp32,w4a4,nipq",
                                    finetune_epochs=2, finetune_kwargs=ft_kw, resume=True, **kw)  # fmt: skip
    assert [r["acr"] for r in again["rows"]] == [r["acr"] for r in res["rows"]]
    assert (out / "finetune" / "w4a4" / "finetune.json").stat().st_mtime_ns == stamp
    with pytest.raises(SearchError, match="--finetune-epochs"):
        table_mod.results_table("ARQ-LeNet5-v0", tmp_path / "t2", rows="fp32,nipq", **kw)
