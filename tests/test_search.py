"""``arq-gym search``: outputs, resume after SIGKILL, bad input; every built-in agent on the
real env at smoke fidelity."""

from __future__ import annotations

import csv
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import toy_env

from arq_gym.cli import main
from arq_gym.experiments.search import SearchError, parse_kwargs, search
from arq_gym.policy import load_policy

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
TOY = toy_env.register()
OUTPUTS = ("run.json", "episodes.csv", "best_policy.json", "search.json", "reward.png",
           "best_bits.png", "state.pkl")  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}  # fmt: skip


def check_outputs(out: Path, episodes: int, final: bool) -> dict:
    for name in OUTPUTS + (("final.json",) if final else ()):
        assert (out / name).is_file(), name
    assert list((out / "tb").glob("events.out.tfevents.*"))
    rows = read_csv(out / "episodes.csv")
    assert [int(r["episode"]) for r in rows] == list(range(1, episodes + 1))
    res = json.loads((out / "search.json").read_text())
    assert {"best_reward", "best_policy", "episodes", "seconds"} <= set(res)
    assert res["episodes"] == episodes
    rewards = [float(r["reward"]) for r in rows]
    assert res["best_reward"] == pytest.approx(max(rewards), rel=1e-5)
    best = [float(r["best_reward"]) for r in rows]
    assert best == sorted(best) and best[-1] == pytest.approx(max(rewards), rel=1e-5)
    assert (out / "reward.png").read_bytes()[:4] == b"\x89PNG"
    return res


# ---------------------------------------------------------------------- kwargs


def test_parse_kwargs_types():
    got = parse_kwargs(["fidelity=smoke", "budget=1/64", "bits=2,8", "images=16", "alpha=1e-3",
                        "keep_first_last=None", "flag=true", "t=(1, 2)", "name=a/b"])  # fmt: skip
    assert got == {"fidelity": "smoke", "budget": 1 / 64, "bits": (2, 8), "images": 16,
                   "alpha": 1e-3, "keep_first_last": None, "flag": True, "t": (1, 2),
                   "name": "a/b"}  # fmt: skip
    assert isinstance(got["images"], int)
    for bad in (["novalue"], ["=3"], ["1x=2"]):
        with pytest.raises(SearchError, match="expected key=value"):
            parse_kwargs(bad)


# ---------------------------------------------------------------------- toy env (fast)


def test_search_writes_every_output_and_resume_of_finished_run_is_a_no_op(tmp_path):
    out = tmp_path / "run"
    res = search(TOY, "random", 8, 3, out, final_eval=False, progress=False)
    check_outputs(out, 8, final=False)
    assert res["best_policy"] == str(out / "best_policy.json")
    policy, doc = load_policy(out / "best_policy.json")
    assert list(policy.w_bits) == res["w_bits"] and doc["env_id"] == TOY
    before = (out / "episodes.csv").read_bytes()
    summary, seconds = (out / "search.json").read_bytes(), _state_seconds(out)
    state, events = (out / "state.pkl").read_bytes(), sorted((out / "tb").iterdir())
    # a run.json of an older version, which recorded the cache folder, still resumes
    run_json = json.loads((out / "run.json").read_text())
    assert "cache_dir" not in run_json["env_kwargs"]
    run_json["env_kwargs"]["cache_dir"] = "old/cache"
    (out / "run.json").write_text(json.dumps(run_json))
    again = search(TOY, "random", 8, 3, out, resume=True, final_eval=False, progress=False)
    assert again["best_reward"] == res["best_reward"] and again["episodes"] == 8
    assert (out / "episodes.csv").read_bytes() == before
    # nothing ran, so no time is added: the summary is byte-identical, the checkpoint's clock stays
    assert (out / "search.json").read_bytes() == summary and _state_seconds(out) == seconds
    # nor is the checkpoint rewritten or a TensorBoard event file added
    assert (out / "state.pkl").read_bytes() == state and sorted((out / "tb").iterdir()) == events
    with pytest.raises(SearchError, match="already has 8 episodes; --episodes 5 would drop"):
        search(TOY, "random", 5, 3, out, resume=True, final_eval=False, progress=False)
    assert (out / "episodes.csv").read_bytes() == before
    more = search(TOY, "random", 11, 3, out, resume=True, final_eval=False, progress=False)
    assert more["episodes"] == 11
    fresh = search(TOY, "random", 11, 3, tmp_path / "fresh", final_eval=False, progress=False)
    assert [r["reward"] for r in read_csv(out / "episodes.csv")] == [
        r["reward"] for r in read_csv(tmp_path / "fresh" / "episodes.csv")]  # fmt: skip
    assert fresh["best_reward"] == more["best_reward"]


def _cli(args: list[str], env_extra: dict | None = None) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env.update(env_extra or {})
    return subprocess.Popen([sys.executable, "-m", "arq_gym", *args], env=env, cwd=str(REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def _state_seconds(out: Path) -> float:
    return pickle.loads((out / "state.pkl").read_bytes())["seconds"]


def _rows(path: Path) -> int:
    try:
        return max(0, len(path.read_text().splitlines()) - 1)
    except OSError:
        return 0


def _kill_after(proc: subprocess.Popen, csv_path: Path, rows: int, timeout: float = 120) -> int:
    t0 = time.time()
    while _rows(csv_path) < rows:
        if proc.poll() is not None:
            raise AssertionError(f"search ended before it was killed: {proc.stderr.read()!r}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("search too slow to reach the kill point")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return _rows(csv_path)


@pytest.mark.parametrize(
    "agent, exact", [("arq-ddpg", True), pytest.param("sb3-ppo", False, marks=pytest.mark.slow)]
)
def test_sigkill_then_resume(tmp_path, agent, exact):
    """Killed with SIGKILL after a few episodes and resumed: every episode exactly once, and
    for the loop-protocol agents the same episodes and best policy as an uninterrupted run."""
    kw = ["--agent-kwargs", "warmup_episodes=3"] if agent == "arq-ddpg" else []
    common = ["search", "--env", f"toy_env:{TOY}", "--agent", agent, "--episodes", "14",
              "--seed", "7", "--env-kwargs", "delay=0.05", *kw, "--no-final-eval",
              "--no-progress", "--json"]  # fmt: skip
    killed = _cli(common + ["--out", str(tmp_path / "run")])
    done_at_kill = _kill_after(killed, tmp_path / "run" / "episodes.csv", 5)
    assert 5 <= done_at_kill < 14
    resumed = _cli(common + ["--out", str(tmp_path / "run"), "--resume"])
    if exact:  # meanwhile, the uninterrupted reference run in this process
        search(TOY, agent, 14, 7, tmp_path / "ref", env_kwargs={"delay": 0.05},
               agent_kwargs={"warmup_episodes": 3}, final_eval=False, progress=False)  # fmt: skip
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    res = json.loads(out.decode().strip().splitlines()[-1])
    assert res["episodes"] == 14
    rows = read_csv(tmp_path / "run" / "episodes.csv")
    assert [int(r["episode"]) for r in rows] == list(range(1, 15))
    assert len(json.loads((tmp_path / "run" / "search.json").read_text())["w_bits"]) == 5
    if not exact:
        return
    ref_rows = read_csv(tmp_path / "ref" / "episodes.csv")
    for a, b in zip(rows, ref_rows):
        assert (a["reward"], a["requested_bits"], a["w_bits"]) == (
            b["reward"], b["requested_bits"], b["w_bits"])  # fmt: skip
    run_policy = json.loads((tmp_path / "run" / "best_policy.json").read_text())
    ref_policy = json.loads((tmp_path / "ref" / "best_policy.json").read_text())
    assert run_policy["layers"] == ref_policy["layers"]
    assert run_policy["metrics"]["reward"] == ref_policy["metrics"]["reward"]


def test_cli_bad_inputs_are_one_line_errors_and_nothing_is_overwritten(tmp_path, capsys):
    def run(*args) -> str:
        code = main(["search", "--env", TOY, "--episodes", "3", "--no-final-eval",
                     "--no-progress", *args])  # fmt: skip
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        return err

    out = tmp_path / "o"
    assert "unknown agent 'nope'" in run("--agent", "nope", "--out", str(out))
    assert "cannot import module 'no_such_pkg'" in run("--agent", "no_such_pkg:A", "--out",
                                                        str(out))  # fmt: skip
    assert "needs Box actions but the env has Discrete(7)" in run(
        "--agent", "arq-ddpg", "--env-kwargs", "action_type=discrete", "--out", str(out)
    )
    assert not out.exists()  # nothing was created by the failures above
    assert "cannot make env 'No-Such-v0'" in run("--env", "No-Such-v0", "--out", str(out))
    assert "expected key=value" in run("--env-kwargs", "fidelity", "--out", str(out))
    assert "episodes must be a positive integer" in run("--episodes", "0", "--out", str(out))
    assert "--final-n must be a positive integer" in run("--final-eval", "--final-n", "0",
                                                         "--out", str(out))  # fmt: skip
    assert not out.exists()

    assert main(["search", "--env", TOY, "--agent", "random", "--episodes", "3", "--out",
                 str(out), "--no-final-eval", "--no-progress"]) == 0  # fmt: skip
    capsys.readouterr()
    before = snapshot(out)
    err = run("--agent", "random", "--out", str(out))
    assert "already holds another search run; pass --resume" in err
    err = run("--agent", "arq-ddpg", "--out", str(out), "--resume")
    assert "holds a run with agent='random'" in err
    err = run("--agent", "random", "--seed", "1", "--out", str(out), "--resume")
    assert "holds a run with seed=0" in err
    assert snapshot(out) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert "already holds files" in run("--agent", "random", "--out", str(other))
    assert "holds files but no search run" in run("--agent", "random", "--out", str(other),
                                                   "--resume")  # fmt: skip
    assert snapshot(other) == {"notes.txt": b"mine"}


def test_custom_agent_example_plugs_in(tmp_path):
    res = search(TOY, str(REPO / "examples" / "custom_agent.py") + ":GreedyLayerSearch", 9, 0,
                 tmp_path / "g", agent_kwargs={"candidates": 3}, final_eval=False,
                 progress=False)  # fmt: skip
    check_outputs(tmp_path / "g", 9, final=False)
    # greedy never loses its incumbent: the best is at least the all-middle first episode
    rows = read_csv(tmp_path / "g" / "episodes.csv")
    assert res["best_reward"] >= float(rows[0]["reward"])


# ---------------------------------------------------------------------- the real env


@pytest.fixture(scope="module")
def lenet_kwargs():
    from conftest import shared_datasets

    data = shared_datasets()
    if data is None:
        pytest.skip("real datasets not found: set ARQ_GYM_DATA=/path/to/datasets or run "
                    "`arq-gym data --download`")  # fmt: skip
    return {"fidelity": "smoke", "data_dir": str(data)}


BUILTINS = ["arq-ddpg", "random", "sb3-ddpg", "sb3-td3", "sb3-sac", "sb3-ppo", "sb3-a2c",
            "sb3-dqn"]  # fmt: skip


@pytest.mark.parametrize("agent", BUILTINS)
def test_every_builtin_agent_searches_lenet_smoke(agent, lenet_kwargs, tmp_path):
    kw = dict(lenet_kwargs)
    if agent == "sb3-dqn":
        kw["action_type"] = "discrete"
    agent_kw = {"warmup_episodes": 3} if agent == "arq-ddpg" else {}
    res = search("ARQ-LeNet5-v0", agent, 5, 0, tmp_path / agent, env_kwargs=kw,
                 agent_kwargs=agent_kw, final_images=8, final_n=200, progress=False)  # fmt: skip
    check_outputs(tmp_path / agent, 5, final=True)
    policy, doc = load_policy(tmp_path / agent / "best_policy.json")
    assert doc["model"] == "lenet5" and doc["sigma"] == 0.25 and len(policy) == 5
    assert doc["bops_fraction"] <= 1 / 64 + 1e-12
    assert doc["metrics"]["fidelity"] == "smoke"
    final = json.loads((tmp_path / agent / "final.json").read_text())
    assert final["images"] == 8 and final["split"] == "test"
    assert final["w_bits"] == res["w_bits"]
    assert 0 <= final["quantized"]["clean_accuracy"] <= 1 and final["fp32"]["acr"] >= 0
    assert res["final"]["fp32_acr"] == final["fp32"]["acr"]


@pytest.mark.slow
def test_sigkill_then_resume_on_lenet_smoke(tmp_path, lenet_kwargs):
    """The real env: killed after a few episodes, resumed, compared with an uninterrupted run."""
    env_kw = [f"{k}={v}" for k, v in lenet_kwargs.items()]
    common = ["search", "--env", "ARQ-LeNet5-v0", "--agent", "arq-ddpg", "--episodes", "10",
              "--seed", "3", "--env-kwargs", *env_kw, "--agent-kwargs", "warmup_episodes=3",
              "--no-final-eval", "--no-progress", "--json"]  # fmt: skip
    killed = _cli(common + ["--out", str(tmp_path / "run")])
    assert 4 <= _kill_after(killed, tmp_path / "run" / "episodes.csv", 4, timeout=300) < 10
    resumed = _cli(common + ["--out", str(tmp_path / "run"), "--resume"])
    ref = search("ARQ-LeNet5-v0", "arq-ddpg", 10, 3, tmp_path / "ref", env_kwargs=lenet_kwargs,
                 agent_kwargs={"warmup_episodes": 3}, final_eval=False, progress=False)  # fmt: skip
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    res = json.loads(out.decode().strip().splitlines()[-1])
    rows = read_csv(tmp_path / "run" / "episodes.csv")
    ref_rows = read_csv(tmp_path / "ref" / "episodes.csv")
    assert [int(r["episode"]) for r in rows] == list(range(1, 11))
    assert [(r["reward"], r["w_bits"], r["a_bits"]) for r in rows] == [
        (r["reward"], r["w_bits"], r["a_bits"]) for r in ref_rows]  # fmt: skip
    assert (res["best_reward"], res["w_bits"], res["a_bits"]) == (
        ref["best_reward"], ref["w_bits"], ref["a_bits"])  # fmt: skip
