"""Thread setting and fork safety (arq_gym.threads; issue 21, findings 1, 3 and 11)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from arq_gym import threads
from arq_gym.threads import ENV_VAR, ThreadsError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def keep_threads(monkeypatch):
    """Restore torch's thread count and ARQ_GYM_THREADS (which the CLI exports) afterwards."""
    old = torch.get_num_threads()
    monkeypatch.delenv(ENV_VAR, raising=False)
    yield
    torch.set_num_threads(old)


def _run_python(code: str, timeout: float, env_extra: dict | None = None,
                data_dir: Path | None = None) -> subprocess.CompletedProcess:  # fmt: skip
    """Run ``code`` in a fresh interpreter in its own process group, with more than one
    OpenMP thread allowed; on timeout the whole group (forked children too) is killed."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", ENV_VAR)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    if data_dir is not None:
        env["ARQ_GYM_DATA"] = str(data_dir)
    env.update(env_extra or {})
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env,
                            cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(
            f"timed out after {timeout} s (hang): stdout {out[-500:]!r} stderr {err[-500:]!r}"
        )
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# --------------------------------------------------------------------------- the setting


@pytest.mark.parametrize("value, expected", [(1, 1), ("3", 3), (" 2 ", 2), (16, 16)])
def test_parse_threads_accepts_positive_integers(value, expected):
    assert threads.parse_threads(value) == expected


@pytest.mark.parametrize("value", [0, -1, "0", "-2", "1.5", "two", "", True, 2.0])
def test_parse_threads_rejects_bad_values_in_one_line(value):
    with pytest.raises(ThreadsError) as err:
        threads.parse_threads(value, "--threads")
    msg = str(err.value)
    assert "--threads must be a positive integer" in msg and "\n" not in msg


def test_configured_and_worker_threads(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert threads.configured_threads() is None
    cores = threads.cores()
    assert threads.worker_threads(1) == cores
    assert threads.worker_threads(2) == max(1, cores // 2)
    assert threads.worker_threads(10 * cores) == 1  # never 0
    monkeypatch.setenv(ENV_VAR, "3")
    assert threads.configured_threads() == 3
    assert threads.worker_threads(1) == threads.worker_threads(64) == 3  # the setting wins
    monkeypatch.setenv(ENV_VAR, "0")
    with pytest.raises(ThreadsError, match=ENV_VAR):
        threads.worker_threads(2)


def test_limited_threads_lowers_and_restores_but_never_raises(keep_threads):
    from arq_gym.agents.base import torch_threads

    torch.set_num_threads(2)
    with threads.limited_threads(1) as used:
        assert used == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)
    with torch_threads(4):  # the process's setting (1) is not exceeded
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 1


def test_every_command_accepts_threads():
    from arq_gym.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert len(sub.choices) >= 5
    for name, p in sub.choices.items():
        assert "--threads" in p._option_string_actions, name


def test_cli_threads_option_sets_and_exports(keep_threads, capsys):
    from arq_gym.cli import main

    torch.set_num_threads(2)
    assert main(["envs", "--json", "--threads", "1"]) == 0
    assert torch.get_num_threads() == 1
    assert os.environ[ENV_VAR] == "1"  # the processes a command starts inherit it
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["envs"]


def test_cli_honours_the_environment_variable(keep_threads, monkeypatch, capsys):
    from arq_gym.cli import main

    torch.set_num_threads(2)
    monkeypatch.setenv(ENV_VAR, "1")
    assert main(["envs", "--json"]) == 0
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("argv, env, word", [
    (["envs", "--threads", "0"], None, "--threads"),
    (["envs", "--threads", "-2"], None, "--threads"),
    (["envs", "--threads", "x"], None, "--threads"),
    (["envs"], "1.5", ENV_VAR),
    (["bench-speed", "--quick", "--threads", "0"], None, "--threads"),
])  # fmt: skip
def test_cli_bad_thread_values_give_one_line_error(keep_threads, monkeypatch, capsys, argv, env,
                                                    word):  # fmt: skip
    from arq_gym.cli import main

    if env is not None:
        monkeypatch.setenv(ENV_VAR, env)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and word in err and "positive integer" in err


def test_import_warns_on_a_bad_environment_variable():
    res = _run_python("""
        import warnings
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as w:
            import arq_gym
        print([str(x.message) for x in w])
    """, timeout=120, env_extra={ENV_VAR: "zero"})  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "ARQ_GYM_THREADS must be a positive integer" in res.stdout


def test_cli_bad_environment_variable_is_one_line_in_a_fresh_process():
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR} | {ENV_VAR: "abc"}
    res = subprocess.run([sys.executable, "-m", "arq_gym", "envs"], env=env, cwd=str(REPO),
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "arq-gym envs: error: ARQ_GYM_THREADS must be a positive integer, got 'abc'"
    ]


def test_import_applies_the_environment_variable():
    res = _run_python("""
        import torch
        torch.set_num_threads(2)
        import arq_gym
        print(torch.get_num_threads())
    """, timeout=120, env_extra={ENV_VAR: "1"})  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["1"]


# --------------------------------------------------------------------------- forks


def test_fork_after_openmp_work_does_not_hang():
    """A child forked after the parent ran multi-threaded OpenMP regions used to block forever
    in its first parallel region (libgomp is not fork-safe); the package's at-fork handler
    gives it one thread, and set_threads cannot raise it there."""
    res = _run_python("""
        import os, time
        import torch
        import arq_gym
        from arq_gym import threads

        torch.set_num_threads(2)
        x = torch.randn(1_000_000)
        for _ in range(5):
            (x * 2 + 1).clamp(0, 1).sum()  # multi-threaded OpenMP regions in the parent
        pid = os.fork()
        if pid == 0:
            assert threads.forked_child()
            assert threads.set_threads(2) == 1
            y = torch.randn(1_000_000)
            (y * 2 + 1).clamp(0, 1).sum()
            print("child", torch.get_num_threads(), flush=True)
            os._exit(0)
        t0 = time.time()
        while time.time() - t0 < 60:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                print("parent", os.waitstatus_to_exitcode(status), torch.get_num_threads())
                break
            time.sleep(0.05)
        else:
            os.kill(pid, 9)
            print("child hung")
    """, timeout=180)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["child", "1", "parent", "0", "2"], res.stdout


def test_async_vector_env_with_fork_finishes_an_episode(data_dir):
    """Finding 1: gym.make_vec(..., "async") with the default (fork) start method, after the
    parent built an env (and so ran OpenMP), finishes an episode."""
    res = _run_python(f"""
        import multiprocessing as mp
        import numpy as np
        import torch
        import gymnasium as gym
        import arq_gym

        torch.set_num_threads(2)  # more than one OpenMP thread in the parent, on any machine
        if mp.get_start_method() != "fork":
            raise SystemExit("no fork start method")
        envs = gym.make_vec("ARQ-LeNet5-v0", num_envs=2, vectorization_mode="async",
                            vector_kwargs={{}}, fidelity="smoke", data_dir={str(data_dir)!r})
        envs.reset(seed=0)
        envs.action_space.seed(0)
        steps, done = 0, np.zeros(2, bool)
        while not done.all() and steps < 10:
            _, reward, term, trunc, _ = envs.step(envs.action_space.sample())
            done |= term | trunc
            steps += 1
        envs.close()
        print(steps, bool(done.all()), [float(r) for r in reward])
    """, timeout=600)  # fmt: skip
    if "no fork start method" in res.stderr:
        pytest.skip("no fork start method here")
    assert res.returncode == 0, res.stderr[-2000:]
    steps, done, rewards = res.stdout.strip().splitlines()[-1].split(" ", 2)
    assert steps == "5" and done == "True"
    assert all(0.0 <= r <= 10.0 for r in json.loads(rewards))


# --------------------------------------------------------------------------- bench-speed


def test_thread_probe_measures_both_settings():
    from arq_gym.experiments.bench_speed import thread_probe

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten())
    res = thread_probe(model, (3, 16, 16), batch=8, seconds=0.05, rounds=1, processes=2,
                       settings=(2, 1))  # fmt: skip
    assert res["processes"] == 2 and res["cores"] == threads.cores()
    for part in ("one_process", "concurrent", "per_process"):
        assert set(res[part]) == {"2", "1"} and all(v > 0 for v in res[part].values())
    assert res["per_process"]["1"] == pytest.approx(res["concurrent"]["1"] / 2, rel=0.01)
    assert res["best"] in (1, 2)


def test_profiler_prints_no_usdt_lines():
    """Finding 11: bench-speed's time breakdown (torch.profiler) printed kineto's
    ``USDT: ... profiler_start`` / ``profiler_stop`` lines on stderr."""
    res = _run_python("""
        import os
        import torch
        from arq_gym.experiments.bench_speed import time_breakdown

        out = time_breakdown(torch.nn.Conv2d(3, 4, 3), torch.rand(2, 3, 8, 8), rounds=2)
        print(sorted(out), os.environ.get("KINETO_LOG_LEVEL"))
    """, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "int8_conv_share" in res.stdout and res.stdout.strip().endswith("None")
    assert "USDT" not in res.stderr and "profiler_start" not in res.stderr, res.stderr
