"""``arq-gym pareto``: one search per budget, every point certified alike, the front."""

from __future__ import annotations

import csv
import json

import pytest

from arq_gym.cli import main
from arq_gym.experiments.pareto import budget_label, pareto
from arq_gym.experiments.search import SearchError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_budget_label():
    assert budget_label(1 / 64) == "1/64" and budget_label(0.02) == "1/50"
    assert budget_label(0.03) == "0.03"


def test_front_of_searches_uniform_and_fp32(tmp_path, data_dir, capsys):
    out = tmp_path / "front"
    argv = ["pareto", "--env", "ARQ-LeNet5-v0", "--agent", "random", "--budgets", "1/32,1/64",
            "--episodes", "2", "--uniform-bits", "8,4", "--images", "6", "--n", "100", "--n0",
            "10", "--chunk", "4", "--out", str(out), "--env-kwargs", "fidelity=smoke",
            f"data_dir={data_dir}", "--no-progress", "--json"]  # fmt: skip
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    names = [p["point"] for p in res["points"]]
    assert names == ["fp32", "w8a8", "w4a4", "random@1/32", "random@1/64"]
    for p in res["points"]:
        if p["kind"] == "search":
            assert p["bops_percent"] <= 100 * p["budget"] + 1e-9
        assert p["acr_low"] <= p["acr"] <= p["acr_high"]
    assert any(p["on_front"] for p in res["points"])
    with open(out / "front.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and (out / "front.png").stat().st_size > 10_000
    assert "| random@1/64 |" in (out / "front.md").read_text()
    assert (out / "searches" / "1-32" / "episodes.csv").is_file()
    # resumed: searches and certificates are read back, the figures are the same
    stamp = (out / "certs" / "fp32.json").stat().st_mtime_ns
    assert main(argv[:-1] + ["--resume"]) == 0
    assert (out / "certs" / "fp32.json").stat().st_mtime_ns == stamp
    with pytest.raises(SearchError, match="not empty"):
        pareto("ARQ-LeNet5-v0", "random", ["1/64"], 2, out, env_kwargs={"fidelity": "smoke"})
    with pytest.raises(SearchError, match="budget"):
        pareto("ARQ-LeNet5-v0", "random", ["2"], 2, tmp_path / "x")
