"""``arq-gym benchmark``: leaderboard contents, resume without repeating finished searches,
parallel workers, bad input."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import toy_env

from arq_gym.cli import main
from arq_gym.experiments.benchmark import LEADERBOARD_FIELDS, benchmark, episodes_to_fraction
from arq_gym.experiments.search import SearchError

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
TOY = toy_env.register()
TOY_MOD = f"toy_env:{TOY}"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")
            if p.is_file()}  # fmt: skip


def test_episodes_to_fraction():
    assert episodes_to_fraction([0.1, 0.5, 0.96, 1.0]) == 3
    assert episodes_to_fraction([1.0, 1.0]) == 1
    assert episodes_to_fraction([-0.5, -0.2, -0.1]) == 3  # 95% of a negative best: >= -0.105
    assert episodes_to_fraction([-0.5, -0.104, -0.1]) == 2


def test_benchmark_leaderboard_and_resume_repeats_no_finished_search(tmp_path):
    out = tmp_path / "bench"
    # "module:EnvId" so that spawned worker processes import the module registering the env
    res = benchmark(TOY_MOD, ["random", "arq-ddpg"], 2, 6, out, final_eval=False, progress=False,
                    agent_kwargs=["arq-ddpg:warmup_episodes=2"])  # fmt: skip
    rows = read_csv(out / "leaderboard.csv")
    assert list(rows[0]) == LEADERBOARD_FIELDS
    assert [r["agent"] for r in rows] == ["random", "arq-ddpg"]
    for r in rows:
        assert int(r["runs"]) == 2 and int(r["evaluations"]) == 12
        assert 1 <= float(r["episodes_to_95_mean"]) <= 6
    runs = {r["run"]: r for r in res["runs"]}
    assert set(runs) == {"random-s0", "random-s1", "arq-ddpg-s0", "arq-ddpg-s1"}
    best = [runs[f"random-s{s}"]["best_reward"] for s in range(2)]
    assert float(rows[0]["best_reward_mean"]) == pytest.approx(sum(best) / 2, rel=1e-5)
    md = (out / "leaderboard.md").read_text()
    assert "| random | 2 |" in md and "| arq-ddpg | 2 |" in md and "episodes to 95%" in md
    assert (out / "best_so_far.png").read_bytes()[:4] == b"\x89PNG"
    for run in runs:
        assert list((out / "runs" / run / "tb").glob("events.out.tfevents.*"))
    cfg = json.loads((out / "runs" / "arq-ddpg-s1" / "run.json").read_text())
    assert cfg["agent_kwargs"] == {"warmup_episodes": 2} and cfg["seed"] == 1

    before = mtimes(out / "runs")
    again = benchmark(TOY_MOD, ["random", "arq-ddpg"], 3, 6, out, resume=True,
                      final_eval=False, progress=False,
                      agent_kwargs=["arq-ddpg:warmup_episodes=2"])  # fmt: skip
    assert sorted(again["skipped"]) == sorted(runs)
    after = mtimes(out / "runs")
    assert {k: after[k] for k in before} == before  # finished searches untouched
    assert (out / "runs" / "random-s2" / "search.json").is_file()
    assert [int(r["runs"]) for r in read_csv(out / "leaderboard.csv")] == [3, 3]


@pytest.mark.slow
def test_benchmark_parallel_workers_match_sequential(tmp_path):
    par = benchmark(TOY_MOD, ["random", "arq-ddpg"], 2, 6, tmp_path / "par", workers=2,
                    final_eval=False, progress=False,
                    agent_kwargs=["arq-ddpg:warmup_episodes=2"])  # fmt: skip
    seq = benchmark(TOY_MOD, ["random", "arq-ddpg"], 2, 6, tmp_path / "seq", workers=1,
                    final_eval=False, progress=False,
                    agent_kwargs=["arq-ddpg:warmup_episodes=2"])  # fmt: skip
    assert [(r["run"], r["best_reward"], r["w_bits"]) for r in par["runs"]] == [
        (r["run"], r["best_reward"], r["w_bits"]) for r in seq["runs"]]  # fmt: skip
    assert read_csv(tmp_path / "par" / "leaderboard.csv")[0]["agent"] == "random"


def test_benchmark_bad_inputs(tmp_path, capsys):
    with pytest.raises(SearchError, match="listed twice"):
        benchmark(TOY, ["random", "random"], 1, 2, tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="unknown agent 'nope'"):
        benchmark(TOY, ["random", "nope"], 1, 2, tmp_path / "a", progress=False)
    with pytest.raises(SearchError, match="not in --agents"):
        benchmark(TOY, ["random"], 1, 2, tmp_path / "a", progress=False,
                  agent_kwargs=["arq-ddpg:warmup_episodes=2"])  # fmt: skip
    with pytest.raises(SearchError, match="--seeds must be a positive integer"):
        benchmark(TOY, ["random"], 0, 2, tmp_path / "a", progress=False)
    assert not (tmp_path / "a").exists()
    benchmark(TOY, ["random"], 1, 2, tmp_path / "a", final_eval=False, progress=False)
    code = main(["benchmark", "--env", TOY, "--agents", "random", "--seeds", "1", "--episodes",
                 "2", "--out", str(tmp_path / "a"), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "already holds another benchmark; pass --resume" in err
    assert len(err.splitlines()) == 1
    code = main(["benchmark", "--env", TOY, "--agents", "random", "--seeds", "1", "--episodes",
                 "2", "--out", str(tmp_path / "a"), "--resume", "--env-kwargs", "delay=0.01",
                 "--no-progress"])  # fmt: skip
    assert code == 2 and "holds a benchmark with env_kwargs" in capsys.readouterr().err


@pytest.mark.slow
def test_benchmark_sigkill_then_resume(tmp_path):
    out = tmp_path / "b"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    args = [sys.executable, "-m", "arq_gym", "benchmark", "--env", f"toy_env:{TOY}",
            "--agents", "random,arq-ddpg", "--seeds", "1", "--episodes", "8", "--out", str(out),
            "--env-kwargs", "delay=0.1", "--agent-kwargs", "arq-ddpg:warmup_episodes=2",
            "--no-final-eval", "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(args, env=env, cwd=str(REPO), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip
    ddpg_csv = out / "runs" / "arq-ddpg-s0" / "episodes.csv"
    t0 = time.time()
    while not (ddpg_csv.is_file() and len(ddpg_csv.read_text().splitlines()) >= 3):
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() - t0 < 120, "benchmark too slow to reach the kill point"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = out / "runs" / "random-s0"
    assert (finished / "search.json").is_file()
    before = mtimes(finished)
    done = subprocess.run(args + ["--resume", "--json"], env=env, cwd=str(REPO),
                          capture_output=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    res = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert res["skipped"] == ["random-s0"]
    assert mtimes(finished) == before
    rows = read_csv(ddpg_csv)
    assert [int(r["episode"]) for r in rows] == list(range(1, 9))


@pytest.fixture(scope="module")
def lenet_kwargs():
    from conftest import shared_datasets

    data = shared_datasets()
    if data is None:
        pytest.skip("real datasets not found: set ARQ_GYM_DATA")
    return ["fidelity=smoke", f"data_dir={data}"]


def _lenet_benchmark(tmp_path, lenet_kwargs, episodes: int, workers: int) -> list[dict]:
    out = tmp_path / "lenet"
    code = main(["benchmark", "--env", "ARQ-LeNet5-v0", "--agents", "random,arq-ddpg,sb3-ppo",
                 "--seeds", "2", "--episodes", str(episodes), "--out", str(out), "--workers",
                 str(workers), "--agent-kwargs", "arq-ddpg:warmup_episodes=3",
                 "--final-images", "8", "--final-n", "200", "--no-progress",
                 "--env-kwargs", *lenet_kwargs])  # fmt: skip
    assert code == 0
    rows = read_csv(out / "leaderboard.csv")
    assert [r["agent"] for r in rows] == ["random", "arq-ddpg", "sb3-ppo"]
    for r in rows:
        for key in LEADERBOARD_FIELDS:
            assert r[key] not in ("", "nan"), (r["agent"], key)
        assert 0 < float(r["bops_fraction_mean"]) <= 1 / 64 + 1e-9
        assert int(r["evaluations"]) == 2 * episodes
    assert (out / "cache" / "evals").is_dir()  # the shared persistent evaluation cache
    assert list((out / "cache" / "final_fp32").glob("*.json"))
    assert "FP32 network on the same test images" in (out / "leaderboard.md").read_text()
    return rows


def test_benchmark_lenet_smoke(tmp_path, lenet_kwargs):
    _lenet_benchmark(tmp_path, lenet_kwargs, episodes=4, workers=1)
    # the recorded settings name no path of this machine (the cache folder is not part of a
    # run's identity), so a committed benchmark resumes from another clone: moved, it is done
    out = tmp_path / "lenet"
    for path in [out / "benchmark.json", *out.glob("runs/*/run.json")]:
        assert str(tmp_path) not in path.read_text(), path
        assert "cache_dir" not in json.loads(path.read_text())["env_kwargs"], path
    moved = tmp_path / "elsewhere" / "lenet"
    moved.parent.mkdir()
    out.rename(moved)
    code = main(["benchmark", "--env", "ARQ-LeNet5-v0", "--agents", "random,arq-ddpg,sb3-ppo",
                 "--seeds", "2", "--episodes", "4", "--out", str(moved), "--resume",
                 "--agent-kwargs", "arq-ddpg:warmup_episodes=3", "--final-images", "8",
                 "--final-n", "200", "--no-progress", "--env-kwargs", *lenet_kwargs])  # fmt: skip
    assert code == 0
    assert len(json.loads((moved / "summary.json").read_text())["skipped"]) == 6


@pytest.mark.slow
def test_benchmark_lenet_acceptance_size(tmp_path, lenet_kwargs):
    """The issue's acceptance command at smoke fidelity: 3 agents x 2 seeds x 20 episodes."""
    _lenet_benchmark(tmp_path, lenet_kwargs, episodes=20, workers=2)
