"""Benchmark search agents against each other: agents x seeds searches and a leaderboard.

:func:`benchmark` is what ``arq-gym benchmark`` runs. Layout of its output folder::

    benchmark.json        the settings (env id and kwargs, agents, seeds, episodes, ...)
    runs/<agent>-s<seed>/ one search each (arq_gym.experiments.search: episodes.csv, best_policy.json,
                          tb/, final.json, ...)
    cache/                the persistent evaluation cache the runs share (env kwarg cache_dir)
    leaderboard.md/.csv   one row per agent (see LEADERBOARD_FIELDS)
    best_so_far.png       best reward so far against episode, mean over seeds with a band
                          (min to max across seeds)
    summary.json          the per-run results and the leaderboard rows

Up to ``workers`` searches run in parallel processes (``spawn``); each process gets
``ARQ_GYM_THREADS`` (or ``--threads``) torch threads, by default ``cores // processes``
(:func:`arq_gym.threads.worker_threads`). Every search checkpoints after each episode, so an
interrupted benchmark continues with ``resume=True``: finished searches are not run again,
unfinished ones resume from their last completed episode.

Worker processes start fresh: the ``ARQ-*`` ids are registered there by ``import arq_gym``; an
env of your own must be named ``"your_module:YourEnv-v0"`` so that Gymnasium imports the module
that registers it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from arq_gym.experiments.parallel import run_searches
from arq_gym.experiments.search import (
    SearchError,
    _normalise,
    finished_search,
    load_records,
    recorded_env_kwargs,
)
from arq_gym.files import atomic_write_bytes, atomic_write_text, dumps

__all__ = ["LEADERBOARD_FIELDS", "benchmark", "episodes_to_fraction", "parse_agent_kwargs"]

BENCH_FORMAT = "arq-benchmark/1"
#: columns of leaderboard.csv
LEADERBOARD_FIELDS = [
    "agent", "runs", "best_reward_mean", "best_reward_std", "final_acr_mean",
    "final_clean_accuracy_mean", "final_certified_accuracy_0.25_mean",
    "final_certified_accuracy_0.5_mean", "bops_fraction_mean", "episodes_to_95_mean",
    "wall_seconds_mean", "evaluations", "cache_hits",
]  # fmt: skip


def parse_agent_kwargs(items: Sequence[str] | None, agents: Sequence[str]) -> dict[str, dict]:
    """``["key=value", "agent:key=value", ...]`` -> hyperparameters per agent.

    A plain ``key=value`` applies to every agent, ``agent:key=value`` to that agent only
    (e.g. ``arq-ddpg:warmup_episodes=10``).
    """
    from arq_gym.experiments.search import parse_kwargs

    out: dict[str, dict] = {a: {} for a in agents}
    for item in items or []:
        head, sep, _ = item.partition("=")
        target = None
        if ":" in head:
            target, _, key = head.rpartition(":")
            if target not in out:
                raise SearchError(f"--agent-kwargs {item!r}: agent {target!r} is not in --agents")
            item = key + item[len(head) :]
        kv = parse_kwargs([item], "agent-kwargs")
        for a in [target] if target else agents:
            out[a].update(kv)
    return out


def episodes_to_fraction(best_so_far: Sequence[float], fraction: float = 0.95) -> int:
    """First episode (1-based) whose best-so-far reaches ``fraction`` of the final best.

    "Reaches" means ``>= best - (1 - fraction) * |best|``, so it also works for negative
    rewards (e.g. ``acr_delta``).
    """
    best = float(best_so_far[-1])
    level = best - (1.0 - fraction) * abs(best)
    for i, b in enumerate(best_so_far):
        if b >= level - 1e-12:
            return i + 1
    return len(best_so_far)


def _run_name(agent: str, seed: int) -> str:
    base = agent.rpartition(":")[2] if ":" in agent else agent
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", base)
    return f"{base}-s{seed}"


def _accepts(env_id: str, kwarg: str) -> bool:
    """Whether the env registered as ``env_id`` takes keyword argument ``kwarg``."""
    import inspect

    import gymnasium as gym

    import arq_gym  # noqa: F401 - registers the envs

    try:
        if ":" in env_id:  # "module:EnvId": gym.make imports the module that registers it
            import importlib

            module, _, env_id = env_id.partition(":")
            importlib.import_module(module)
        spec = gym.spec(env_id)
    except ModuleNotFoundError as exc:
        raise SearchError(f"cannot make env {env_id!r}: {exc}") from None
    except gym.error.Error as exc:
        raise SearchError(f"cannot make env {env_id!r}: {str(exc).splitlines()[0]}") from None
    if kwarg in (spec.kwargs or {}):
        return True
    entry = spec.entry_point
    try:
        fn = gym.envs.registration.load_env_creator(entry) if isinstance(entry, str) else entry
        params = inspect.signature(fn).parameters.values()
    except (ValueError, TypeError, ImportError, AttributeError):
        return False
    return any(p.name == kwarg or p.kind is p.VAR_KEYWORD for p in params)


def benchmark(
    env_id: str,
    agents: Sequence[str],
    seeds: int,
    episodes: int,
    out: str | os.PathLike,
    *,
    workers: int = 1,
    env_kwargs: Mapping[str, Any] | None = None,
    agent_kwargs: Mapping[str, Mapping[str, Any]] | Sequence[str] | None = None,
    resume: bool = False,
    final_eval: bool = True,
    final_images: int = 500,
    final_n: int = 10_000,
    final_n0: int = 100,
    final_alpha: float = 0.001,
    progress: bool = True,
    backend: str = "local",
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Run every agent with seeds ``0..seeds-1`` for ``episodes`` episodes; write the leaderboard.

    ``agent_kwargs`` maps agent name -> hyperparameters (or is a list of CLI items, see
    :func:`parse_agent_kwargs`). The env gets ``cache_dir=<out>/cache`` unless ``env_kwargs``
    names one. ``backend``/``ray_address``: where the searches run
    (:func:`arq_gym.experiments.parallel.run_searches`). Returns ``{"leaderboard": rows, "runs": results, "out": ..., "seconds": ...,
    "skipped": finished runs not repeated}``.
    """
    from arq_gym import agents as agents_mod

    t0 = time.perf_counter()
    agents = list(agents)
    if not agents:
        raise SearchError("--agents: give at least one agent")
    if len(set(agents)) != len(agents):
        raise SearchError(f"--agents: an agent is listed twice ({', '.join(agents)})")
    for a in agents:
        agents_mod.get(a)
    for name, v in (("seeds", seeds), ("episodes", episodes), ("workers", workers)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise SearchError(f"--{name} must be a positive integer, got {v!r}")
    if agent_kwargs is None or isinstance(agent_kwargs, (list, tuple)):
        per_agent = parse_agent_kwargs(agent_kwargs, agents)
    else:
        per_agent = {a: dict(agent_kwargs.get(a, {})) for a in agents}
    out = Path(out)
    env_kwargs = dict(env_kwargs or {})
    if "cache_dir" not in env_kwargs and _accepts(env_id, "cache_dir"):
        env_kwargs["cache_dir"] = str((out / "cache").resolve())
    config = {"format": BENCH_FORMAT, "env_id": env_id,
              "env_kwargs": recorded_env_kwargs(env_kwargs)}

    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    bench_json = out / "benchmark.json"
    if entries and not resume:
        what = "another benchmark" if bench_json.is_file() else "files"
        raise SearchError(f"output dir {out} already holds {what}; pass --resume to continue "
                          "it or choose an empty --out")  # fmt: skip
    if entries and resume:
        if not bench_json.is_file():
            raise SearchError(f"output dir {out} holds files but no benchmark (benchmark.json)")
        prev = json.loads(bench_json.read_text())
        prev["env_kwargs"] = recorded_env_kwargs(prev.get("env_kwargs") or {})  # older versions
        for key in ("env_id", "env_kwargs"):
            if prev.get(key) != config[key]:
                raise SearchError(f"output dir {out} holds a benchmark with {key}="
                                  f"{prev.get(key)!r}, not {config[key]!r}")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(bench_json, dumps(config | {
        "agents": agents, "seeds": seeds, "episodes": episodes,
        "agent_kwargs": _normalise(per_agent), "final_eval": final_eval,
        "final_images": final_images, "final_n": final_n}))  # fmt: skip

    jobs, results, skipped = [], {}, []
    for agent in agents:
        for seed in range(seeds):
            run = _run_name(agent, seed)
            run_dir = out / "runs" / run
            done = finished_search(run_dir, episodes, final_eval)
            if done is not None:
                results[run] = done | {"run": run}
                skipped.append(run)
                continue
            jobs.append({"run": run, "search": dict(
                env_id=env_id, agent=agent, episodes=episodes, seed=seed, out=str(run_dir),
                env_kwargs=env_kwargs, agent_kwargs=per_agent[agent], resume=True,
                final_eval=final_eval, final_images=final_images, final_n=final_n,
                final_n0=final_n0, final_alpha=final_alpha, progress=False)})  # fmt: skip

    found, errors = run_searches(jobs, workers, prepare=(env_id, env_kwargs), progress=progress,
                                 desc="benchmark", total=len(agents) * seeds, done=len(skipped),
                                 backend=backend, ray_address=ray_address)  # fmt: skip
    results.update(found)

    order = [_run_name(a, s) for a in agents for s in range(seeds)]
    runs = [results[r] for r in order if r in results]
    rows = _leaderboard(out, agents, seeds, runs)
    _write_leaderboard(out, rows, env_id, episodes, seeds, runs)
    _plot_best_so_far(out, agents, seeds, episodes, env_id)
    summary = {"env_id": env_id, "out": str(out), "leaderboard": rows, "runs": runs,
               "skipped": skipped, "seconds": time.perf_counter() - t0}  # fmt: skip
    atomic_write_text(out / "summary.json", dumps(summary))
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(agents) * seeds} searches failed; first: "
                           f"{errors[0]['run']}: {errors[0]['error']}")  # fmt: skip
    return summary


def _mean(values: Sequence[float]) -> float:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else float("nan")


def _leaderboard(out: Path, agents: Sequence[str], seeds: int, runs: Sequence[dict]) -> list[dict]:
    rows = []
    for agent in agents:
        mine = [r for r in runs if r["agent"] == agent]
        if not mine:
            continue
        best = [float(r["best_reward"]) for r in mine]
        fin = [r.get("final") or {} for r in mine]
        to95 = []
        for r in mine:
            recs = load_records(out / "runs" / r["run"])
            if recs:
                to95.append(episodes_to_fraction([x["best_reward"] for x in recs]))
        cert = [f.get("certified_accuracy", {}) for f in fin]
        rows.append({
            "agent": agent, "runs": len(mine),
            "best_reward_mean": float(np.mean(best)),
            "best_reward_std": float(np.std(best, ddof=1)) if len(best) > 1 else 0.0,
            "final_acr_mean": _mean([f.get("acr") for f in fin]),
            "final_clean_accuracy_mean": _mean([f.get("clean_accuracy") for f in fin]),
            "final_certified_accuracy_0.25_mean": _mean([c.get("0.25") for c in cert]),
            "final_certified_accuracy_0.5_mean": _mean([c.get("0.5") for c in cert]),
            "bops_fraction_mean": _mean([f.get("bops_fraction") for f in fin]) if any(fin)
            else float("nan"),
            "episodes_to_95_mean": _mean(to95),
            "wall_seconds_mean": _mean([r["seconds"] for r in mine]),
            "evaluations": int(sum(r.get("evaluations", 0) for r in mine)),
            "cache_hits": int(sum(r.get("cache_hits", 0) for r in mine)),
        })  # fmt: skip
    return rows


def _fmt(v: Any, digits: int = 4) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.{digits}g}"
    return str(v)


def _write_leaderboard(out: Path, rows: Sequence[dict], env_id: str, episodes: int, seeds: int,
                       runs: Sequence[dict]) -> None:  # fmt: skip
    buf = io.StringIO()
    w = csv.DictWriter(buf, LEADERBOARD_FIELDS, lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(out / "leaderboard.csv", buf.getvalue())

    fp = next((r["final"] for r in runs if r.get("final") and "fp32_acr" in r["final"]), None)
    lines = [
        f"# Leaderboard: {env_id}",
        "",
        f"{seeds} seed(s) x {episodes} episodes per agent. Best reward: the best episode "
        "reward of a search (mean ± sample std over seeds). Final columns: full certification "
        "of each search's best policy on test images (mean over seeds). Episodes to 95%: first "
        "episode whose best-so-far is within 5% of the search's best.",
        "",
        "| agent | runs | best reward | final ACR | final clean acc | final cert acc @0.25 "
        "| @0.5 | BOPs % of FP32 | episodes to 95% | wall s / run | evaluations | cache hits |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: -r["best_reward_mean"]):
        bops = r["bops_fraction_mean"]
        lines.append(
            f"| {r['agent']} | {r['runs']} | {_fmt(r['best_reward_mean'])} ± "
            f"{_fmt(r['best_reward_std'], 2)} | {_fmt(r['final_acr_mean'])} | "
            f"{_fmt(r['final_clean_accuracy_mean'])} | "
            f"{_fmt(r['final_certified_accuracy_0.25_mean'])} | "
            f"{_fmt(r['final_certified_accuracy_0.5_mean'])} | "
            f"{'n/a' if math.isnan(bops) else f'{100 * bops:.3g}'} | "
            f"{_fmt(r['episodes_to_95_mean'], 3)} | {_fmt(r['wall_seconds_mean'], 3)} | "
            f"{r['evaluations']} | {r['cache_hits']} |"
        )
    if fp is not None:
        c = fp.get("fp32_certified_accuracy", {})
        lines += ["", f"FP32 network on the same test images ({fp['images']} images, n = "
                      f"{fp['n']}): ACR {_fmt(fp['fp32_acr'])}, clean accuracy "
                      f"{_fmt(fp['fp32_clean_accuracy'])}, certified accuracy @0.25 "
                      f"{_fmt(c.get('0.25', float('nan')))}, @0.5 "
                      f"{_fmt(c.get('0.5', float('nan')))}."]  # fmt: skip
    atomic_write_text(out / "leaderboard.md", "\n".join(lines) + "\n")


def _plot_best_so_far(out: Path, agents: Sequence[str], seeds: int, episodes: int,
                      env_id: str) -> None:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for agent in agents:
        curves = []
        for seed in range(seeds):
            recs = load_records(out / "runs" / _run_name(agent, seed))
            if recs:
                curves.append([r["best_reward"] for r in recs[:episodes]])
        if not curves:
            continue
        n = min(len(c) for c in curves)
        arr = np.array([c[:n] for c in curves])
        x = np.arange(1, n + 1)
        line = ax.plot(x, arr.mean(0), lw=2, label=f"{agent} ({len(curves)} seeds)")[0]
        ax.fill_between(x, arr.min(0), arr.max(0), color=line.get_color(), alpha=0.2)
    ax.set_xlabel("episode")
    ax.set_ylabel("best reward so far")
    ax.set_title(f"{env_id}: mean over seeds, band = min to max")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(out / "best_so_far.png", buf.getvalue())
