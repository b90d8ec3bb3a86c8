"""One search run: an agent on an env for N episodes, with logs, plots, resume and a final test.

:func:`search` is what ``arq-gym search`` runs. Everything lands in one output folder:

=====================  =================================================================
``run.json``           the run's settings (env id, env kwargs but cache_dir, agent, seed, episodes)
                       and the problem's description (model, sigma, budget, fidelity, FP32 figures)
``episodes.csv``       one row per completed episode: requested and enforced bits, BOPs
                       fraction, reward, best so far, ACR, clean and certified accuracy,
                       seconds, cache hit
``best_policy.json``   the best enforced policy (``arq-policy/1``, replay it with
                       ``arq-gym certify --policy``)
``search.json``        the result: ``best_reward``, ``best_policy``, ``episodes``, ``seconds``,
                       evaluations and cache hits
``reward.png``         reward and best-so-far against episode
``best_bits.png``      bits per layer of the best policy (also in TensorBoard)
``tb/``                TensorBoard scalars per episode (reward, best, ACR, certified and clean
                       accuracy, BOPs fraction) and the bits figure
``final.json``         full certification of the best policy on test images, with the FP32
                       network's figures beside it (``final_eval=True``, the default)
``state.pkl``          the checkpoint ``resume=True`` continues from
``final.parts/``       finished chunks of a final evaluation still in progress (removed once
                       ``final.json`` is written; ``resume=True`` continues from them)
=====================  =================================================================

Resume: after every completed episode (every learn call for SB3 agents) the agent's state and
every episode record are written to ``state.pkl`` atomically (temporary file + ``os.replace``),
then the episode's CSV row is appended. A resumed run rewrites ``episodes.csv`` from the
checkpoint, so wherever a run is killed, each episode appears exactly once, and with a
deterministic env and the loop-protocol agents (arq-ddpg, random) the resumed run repeats the
uninterrupted one exactly.
"""

from __future__ import annotations

import ast
import contextlib
import csv
import io
import json
import math
import os
import pickle
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from arq_gym.files import atomic_write_bytes, atomic_write_text, dumps, json_default

__all__ = [
    "CSV_FIELDS",
    "SearchError",
    "atomic_write_bytes",
    "atomic_write_text",
    "final_evaluation",
    "finished_search",
    "load_records",
    "parse_kwargs",
    "search",
]

STATE_FORMAT = "arq-search-state/1"
RUN_FORMAT = "arq-search-run/1"
#: columns of episodes.csv before the per-radius certified accuracy columns
CSV_FIELDS = [
    "episode", "reward", "best_reward", "requested_bits", "w_bits", "a_bits", "bops_fraction",
    "acr", "clean_accuracy", "abstain_rate", "seconds", "eval_seconds", "cache_hit",
]  # fmt: skip
#: settings that must match for ``resume`` to continue a run
_IDENTITY = ("env_id", "agent", "seed", "env_kwargs", "agent_kwargs")


class SearchError(ValueError):
    """Bad input to a search (one-line message)."""


# ---------------------------------------------------------------------- small helpers


def _parse_value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        parts = text.split("/")
        if len(parts) == 2:
            try:
                return float(parts[0]) / float(parts[1])
            except (ValueError, ZeroDivisionError):
                pass
        return text
    if isinstance(value, list):
        value = tuple(value)
    if isinstance(value, (int, float, tuple, str, bool)) or value is None:
        return value
    return text


def parse_kwargs(items: Sequence[str] | None, what: str = "env-kwargs") -> dict[str, Any]:
    """Parse ``["k=v", ...]`` with typed values: int, float (also ``1/64``), tuple (``2,8`` or
    ``(2,8)``), bool, None, else the string itself. A malformed item raises ValueError."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise SearchError(f"--{what}: expected key=value, got {item!r}")
        out[key] = _parse_value(value)
    return out


def _env_problem(env) -> Any:
    return getattr(env.unwrapped, "problem", None)


def _env_layers(env) -> list | None:
    for obj in (_env_problem(env), env.unwrapped):
        layers = getattr(obj, "layers", None) if obj is not None else None
        if layers:
            return list(layers)
    return None


# ---------------------------------------------------------------------- records


def _record(episode: int, reward: float, info: Mapping[str, Any], seconds: float,
            best_reward: float) -> dict[str, Any]:  # fmt: skip
    def f(key: str) -> float:
        v = info.get(key)
        return float(v) if isinstance(v, (int, float, np.number)) else float("nan")

    def bits(key: str) -> list:
        # one bit-width per layer, or [w_bits, a_bits] pairs (requested, bits_mode="wa")
        v = info.get(key)
        if v is None:
            return []
        return [[int(x) for x in b] if isinstance(b, (list, tuple)) else int(b) for b in v]

    cert = info.get("certified_accuracy") or {}
    return {
        "episode": episode, "reward": float(reward), "best_reward": float(best_reward),
        "requested_bits": bits("requested_bits"), "w_bits": bits("w_bits"),
        "a_bits": bits("a_bits"), "bops_fraction": f("bops_fraction"), "acr": f("acr"),
        "clean_accuracy": f("clean_accuracy"), "abstain_rate": f("abstain_rate"),
        "certified_accuracy": {str(k): float(v) for k, v in dict(cert).items()},
        "seconds": float(seconds), "eval_seconds": f("eval_seconds"),
        "cache_hit": bool(info.get("cache_hit", False)),
        "reward_name": info.get("reward_name"),
    }  # fmt: skip


def _radii(records: Sequence[Mapping[str, Any]]) -> list[str]:
    for r in records:
        if r["certified_accuracy"]:
            return sorted(r["certified_accuracy"], key=float)
    return []


def _csv_header(radii: Sequence[str]) -> list[str]:
    return CSV_FIELDS + [f"certified_accuracy_{r}" for r in radii]


def _csv_row(rec: Mapping[str, Any], radii: Sequence[str]) -> list[Any]:
    row = []
    for key in CSV_FIELDS:
        v = rec[key]
        if isinstance(v, list):  # bits per layer; a pair as "w/a"
            v = " ".join("/".join(map(str, b)) if isinstance(b, list) else str(b) for b in v)
        elif isinstance(v, bool):
            v = int(v)
        elif isinstance(v, float):
            v = f"{v:.6g}"
        row.append(v)
    row += [f"{rec['certified_accuracy'].get(r, float('nan')):.6g}" for r in radii]
    return row


def _csv_text(records: Sequence[Mapping[str, Any]], radii: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(_csv_header(radii))
    for rec in records:
        w.writerow(_csv_row(rec, radii))
    return buf.getvalue()


def load_records(out: str | os.PathLike) -> list[dict[str, Any]]:
    """The episode records of the run in ``out`` (from its checkpoint)."""
    state = _read_state(Path(out) / "state.pkl")
    return [] if state is None else list(state["records"])


def _read_state(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            state = pickle.load(f)
    except Exception as exc:  # noqa: BLE001
        raise SearchError(
            f"checkpoint {path} cannot be read ({exc}); remove it to restart"
        ) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise SearchError(f"checkpoint {path} is not an arq-gym search checkpoint")
    return state


# ---------------------------------------------------------------------- figures


def _plot_rewards(records: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["episode"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(ep, [r["reward"] for r in records], ".", ms=4, alpha=0.6, label="reward")
    ax.plot(
        ep,
        [r["best_reward"] for r in records],
        "-",
        lw=2,
        drawstyle="steps-post",
        label="best so far",
    )
    ax.set_xlabel("episode")
    name = next((r.get("reward_name") for r in records if r.get("reward_name")), None)
    ax.set_ylabel(f"reward ({name})" if name else "reward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _bits_figure(rec: Mapping[str, Any], names: Sequence[str] | None, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w, a = rec["w_bits"], rec["a_bits"]
    x = np.arange(len(w))
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(w) + 2), 4))
    ax.bar(x - 0.2, w, 0.4, label="weights")
    ax.bar(x + 0.2, a, 0.4, label="activations")
    ax.set_xticks(x)
    ax.set_xticklabels(names if names else [str(i) for i in x], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("bits")
    ax.set_ylim(0, max(max(w + a, default=8), 8) + 1)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------- final evaluation


def final_evaluation(
    problem: Any,
    w_bits: Sequence[int],
    a_bits: Sequence[int],
    *,
    images: int = 500,
    n: int = 10_000,
    n0: int = 100,
    alpha: float = 0.001,
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    progress: bool = True,
    out: str | os.PathLike | None = None,
    chunk: int | None = None,
    announce: bool = True,
) -> dict[str, Any]:
    """Full certification (CERTIFY, not IRS) of the policy on ``images`` evenly spaced test
    images, and of the FP32 network on the same images with the same noise.

    The FP32 figures are cached in ``problem.cache_dir/final_fp32/`` when the problem has a
    cache folder (a benchmark certifies the FP32 network once). With ``out`` given, the
    per-image TSVs (Cohen layout) are written beside the summary.

    Both certifications are saved every ``chunk`` images (default :func:`auto_chunk`: at most
    about 250,000 forward passes) in ``out/final.parts/`` (the FP32 one beside its cached
    figures when there is a cache folder), so a rerun with the same arguments continues where
    an interrupted one stopped, losing at most one chunk. With ``announce``, one line on
    stderr says beforehand what is certified, its forward passes and about how long they take
    (a rate measured on a few batches).
    """
    import torch

    from arq_gym import data as data_mod
    from arq_gym.policy import Policy
    from arq_gym.smoothing.chunked import auto_chunk

    if images < 1 or n < 1 or n0 < 1:
        raise SearchError("final evaluation needs images, n and n0 >= 1")
    if chunk is not None and chunk < 1:
        raise SearchError(f"the final evaluation's chunk must be >= 1, got {chunk}")
    chunk = auto_chunk(n0, n) if chunk is None else int(chunk)
    splits = data_mod.load(problem.dataset, data_dir=data_dir)
    test = splits.test
    if images > len(test):
        raise SearchError(f"--final-images {images} exceeds the {len(test)} test images")
    idx = np.arange(images, dtype=np.int64) * (len(test) // images)
    sub = test.subset(idx)
    x = torch.from_numpy(np.asarray(sub.x)).float().div_(255.0)
    y = torch.from_numpy(np.asarray(sub.y, dtype=np.int64))
    common = dict(sigma=problem.sigma, n0=n0, n=n, alpha=alpha, batch_size=problem.batch_size,
                  seed=seed, image_keys=idx, device=problem.device, progress=progress,
                  num_classes=problem.num_classes)  # fmt: skip
    policy = Policy(tuple(w_bits), tuple(a_bits))
    problem.quantized.apply(policy)
    if hasattr(problem, "_warm_up"):  # the function certified is known once it is built
        problem._warm_up(policy)
        problem.quantized.apply(policy)
    sub_sha = sub.sha256()
    ident = {"checkpoint_sha256": problem.checkpoint_sha256, "data_sha256": sub_sha,
             "sigma": problem.sigma, "n0": n0, "n": n, "alpha": alpha, "seed": seed}  # fmt: skip
    q_ident = {**ident, "network": "quantized", "function": getattr(problem, "function_id", None),
               "w_bits": list(policy.w_bits), "a_bits": list(policy.a_bits)}  # fmt: skip
    fp_ident = {**ident, "network": "fp32"}
    parts_root = None if out is None else Path(out) / "final.parts"

    fp_key = f"{problem.checkpoint_sha256[:16]}_{sub_sha[:16]}_s{problem.sigma}_n0{n0}_n{n}_a{alpha}_seed{seed}"
    fp_path = None if problem.cache_dir is None else (
        Path(problem.cache_dir) / "final_fp32" / f"{fp_key}.json")  # fmt: skip
    fp = None
    if fp_path is not None and fp_path.is_file():
        with contextlib.suppress(Exception):
            fp = json.loads(fp_path.read_text())
    if fp_path is not None:
        fp_parts = fp_path.with_name(f"{fp_key}.parts")
    else:
        fp_parts = None if parts_root is None else parts_root / "fp32"
    q_parts = None if parts_root is None else parts_root / "quantized"

    jobs = [("the best policy", problem.quantized, q_parts, q_ident)]
    if fp is None:
        fp_net = problem.fp32_network(len(x) * (n0 + n))
        jobs.append(("the FP32 network", fp_net, fp_parts, fp_ident))
    if announce:
        _announce_final(jobs, x, problem, images, n0, n, alpha, chunk, idx)

    def run(net, parts, ident_, desc):
        from arq_gym.smoothing import certify, certify_chunked

        with torch.inference_mode():
            if parts is None:
                return certify(net, x, y, **common)
            return certify_chunked(net, x, y, parts_dir=parts, ident=ident_, chunk=chunk,
                                   desc=desc, **common)  # fmt: skip

    t0 = time.perf_counter()
    cert_q = run(problem.quantized, q_parts, q_ident, "final: best policy")
    seconds_q = time.perf_counter() - t0
    cert_fp = None
    if fp is None:
        cert_fp = run(fp_net, fp_parts, fp_ident, "final: FP32")
        fp = cert_fp.summary()
        if fp_path is not None:
            fp_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(fp_path, dumps(fp))
            import shutil

            shutil.rmtree(fp_parts, ignore_errors=True)
    if out is not None:
        out = Path(out)
        cert_q.to_tsv(out / "final_quantized.tsv")
        if cert_fp is not None:
            cert_fp.to_tsv(out / "final_fp32.tsv")
    from arq_gym.cost import bops_fraction

    return {
        "split": "test", "images": images, "n0": n0, "n": n, "alpha": alpha, "seed": seed,
        "sigma": problem.sigma, "w_bits": list(policy.w_bits), "a_bits": list(policy.a_bits),
        "bops_fraction": bops_fraction(problem.layers, policy),
        "quantized": cert_q.summary(), "fp32": fp, "seconds": seconds_q,
    }  # fmt: skip


def _announce_final(jobs, x, problem, images, n0, n, alpha, chunk, idx) -> None:
    """One line on stderr before the final evaluation: what, forward passes, time, where."""
    from arq_gym.smoothing.chunked import (
        chunks_done,
        format_duration,
        forward_passes,
        measure_rate,
        say,
    )

    names, passes, seconds, rates, resumed = [], 0, 0.0, [], []
    for name, net, parts, ident in jobs:
        done = 0 if parts is None else chunks_done(parts, ident, images, chunk, idx)
        todo = forward_passes(images - done, n0, n)
        names.append(name)
        passes += todo
        if done:
            resumed.append(f"{done} of {images} images of {name} already done")
        if todo:
            try:
                rate = measure_rate(net, x, problem.sigma, problem.batch_size, problem.device)
            except Exception:  # noqa: BLE001 - an estimate only
                rate = float("nan")
            rates.append(f"{rate:,.0f}")
            seconds += todo / rate
    eta = f"about {format_duration(seconds)} here (measured {' and '.join(rates)} images/s)" \
        if rates and math.isfinite(seconds) else "time unknown"  # fmt: skip
    dirs = [str(parts) for _name, _net, parts, _ident in jobs if parts is not None]
    where = ("; not saved as it goes (no output folder)" if not dirs else
             f"; saved every {chunk} images ({', '.join(dirs)}), so an interrupted run continues "
             "from its last chunk with --resume")  # fmt: skip
    extra = f" ({'; '.join(resumed)})" if resumed else ""
    say(f"final evaluation: full CERTIFY of {' and '.join(names)} on {images} test images "
        f"(n0={n0:,}, n={n:,}, alpha={alpha:g}): {passes:,} forward passes to go{extra}, "
        f"{eta}{where}")  # fmt: skip


# ---------------------------------------------------------------------- the search


def _check_out(out: Path, resume: bool) -> dict | None:
    """Validate the output folder; returns the previous run.json under resume."""
    if out.exists() and not out.is_dir():
        raise SearchError(f"output path {out} exists and is not a folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    run_json = out / "run.json"
    if not resume:
        if entries:
            what = "another search run" if run_json.is_file() else "files"
            raise SearchError(f"output dir {out} already holds {what}; pass --resume to "
                              "continue it or choose an empty --out")  # fmt: skip
        return None
    if not entries:
        return None
    if not run_json.is_file():
        raise SearchError(f"output dir {out} holds files but no search run (run.json); "
                          "choose an empty --out")  # fmt: skip
    try:
        prev = json.loads(run_json.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SearchError(f"{run_json} cannot be read ({exc})") from None
    if prev.get("format") != RUN_FORMAT:
        raise SearchError(f"{run_json} is not an arq-gym search run")
    return prev


def finished_search(run_dir: Path, episodes: int, final_eval: bool = False) -> dict | None:
    """A search folder's search.json when its run is complete (``episodes`` done, and the final
    evaluation when ``final_eval``), else None: the runners skip such runs."""
    path = run_dir / "search.json"
    if not path.is_file():
        return None
    try:
        res = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if res.get("episodes") != episodes or (final_eval and "final" not in res):
        return None
    return res


def make_env(env_id: str, env_kwargs: Mapping[str, Any]):
    """``gym.make(env_id, **env_kwargs)``; SearchError (one line) for an unknown id or a bad
    keyword argument."""
    import gymnasium as gym

    import arq_gym  # noqa: F401 - registers the envs

    try:
        return gym.make(env_id, **env_kwargs)
    except gym.error.Error as exc:
        raise SearchError(f"cannot make env {env_id!r}: {str(exc).splitlines()[0]}") from None
    except TypeError as exc:
        raise SearchError(f"env {env_id!r}: {exc}") from None


def _normalise(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=json_default))


def recorded_env_kwargs(env_kwargs: Mapping[str, Any]) -> dict:
    """The env kwargs a run records and compares on ``--resume``: all but ``cache_dir``, which
    says only where this machine keeps the evaluation cache (entries are keyed by content), so
    a committed run names no local path and resumes from another clone or cluster node."""
    return _normalise({k: v for k, v in env_kwargs.items() if k != "cache_dir"})


def search(
    env_id: str,
    agent: str = "arq-ddpg",
    episodes: int = 100,
    seed: int = 0,
    out: str | os.PathLike = "runs/search",
    *,
    env_kwargs: Mapping[str, Any] | None = None,
    agent_kwargs: Mapping[str, Any] | None = None,
    resume: bool = False,
    final_eval: bool = True,
    final_images: int = 500,
    final_n: int = 10_000,
    final_n0: int = 100,
    final_alpha: float = 0.001,
    progress: bool = True,
    tensorboard: bool = True,
    final_chunk: int | None = None,
) -> dict[str, Any]:
    """Run ``agent`` on ``gym.make(env_id, **env_kwargs)`` for ``episodes`` episodes.

    Writes the files listed in the module docstring into ``out`` and returns the content of
    ``search.json``: ``best_reward``, ``best_policy`` (path of best_policy.json), ``w_bits``,
    ``a_bits``, ``best_episode``, ``episodes``, ``seconds`` (wall time over all sessions),
    ``evaluations``, ``cache_hits``, ``out`` and, with ``final_eval``, ``final`` (summary of
    final.json). The final evaluation is announced on stderr with its cost and saved every
    ``final_chunk`` images (default: :func:`~arq_gym.smoothing.chunked.auto_chunk`), so
    ``resume`` continues an interrupted one (see :func:`final_evaluation`).

    Raises :class:`SearchError` (a ValueError) with a one-line message for bad input: unknown
    env id or agent, an agent that cannot drive the env's action space, an output folder that
    holds another run without ``resume`` or a different run with it. Nothing is written then.
    """

    import arq_gym  # noqa: F401 - registers the envs
    from arq_gym import agents as agents_mod

    env_kwargs = dict(env_kwargs or {})
    agent_kwargs = dict(agent_kwargs or {})
    if isinstance(episodes, bool) or not isinstance(episodes, (int, np.integer)) or episodes < 1:
        raise SearchError(f"episodes must be a positive integer, got {episodes!r}")
    if final_eval:
        for name, v in (("final-images", final_images), ("final-n", final_n),
                        ("final-n0", final_n0)):  # fmt: skip
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise SearchError(f"--{name} must be a positive integer, got {v!r}")
        if not 0 < final_alpha < 0.5:
            raise SearchError(f"--final-alpha must be in (0, 0.5), got {final_alpha!r}")
        if final_chunk is not None and (isinstance(final_chunk, bool) or not isinstance(
                final_chunk, (int, np.integer)) or final_chunk < 1):  # fmt: skip
            raise SearchError(f"--final-chunk must be a positive integer, got {final_chunk!r}")
    out = Path(out)
    agents_mod.get(agent)  # a bad agent name fails before anything is built or written
    prev = _check_out(out, resume)
    config = {"format": RUN_FORMAT, "env_id": env_id, "agent": agent, "seed": int(seed),
              "episodes": int(episodes), "env_kwargs": recorded_env_kwargs(env_kwargs),
              "agent_kwargs": _normalise(agent_kwargs)}  # fmt: skip
    if prev is not None:
        prev["env_kwargs"] = recorded_env_kwargs(prev.get("env_kwargs") or {})  # older runs kept it
        diff = [k for k in _IDENTITY if prev.get(k) != config[k]]
        if diff:
            k = diff[0]
            raise SearchError(f"output dir {out} holds a run with {k}={prev.get(k)!r}, not "
                              f"{config[k]!r}; choose another --out")  # fmt: skip

    env = make_env(env_id, env_kwargs)
    config["action_space"] = str(env.action_space)
    if prev is None or "action_space" in prev:
        same = prev is None or prev["action_space"] == config["action_space"]
    else:  # recorded before bits_mode existed: one bit-width per layer
        same = getattr(env.unwrapped, "bits_mode", "tied") == "tied"
    if not same:
        env.close()
        was = prev.get("action_space", "one bit-width per layer (before bits_mode existed)")
        raise SearchError(f"output dir {out} holds a run whose env had action space {was}, "
                          f"not {config['action_space']}; resume it with the env kwargs it was "
                          "made with (runs made before bits_mode existed: add "
                          "--env-kwargs bits_mode=tied) or choose another --out")  # fmt: skip
    base = (prev or {}).get("problem", {}).get("checkpoint_sha256")
    problem = _env_problem(env)
    now = getattr(problem, "checkpoint_sha256", None)
    if base is not None and now is not None and base != now:
        env.close()
        raise SearchError(f"output dir {out} holds a run searched on the base model {base[:16]}..., "
                          f"but the env now loads {now[:16]}... (the shipped model changed?); "
                          "choose another --out")  # fmt: skip
    try:
        return _run(env, env_id, agent, int(episodes), int(seed), out, config, env_kwargs,
                    agent_kwargs, final_eval, final_images, final_n, final_n0, final_alpha,
                    progress, tensorboard, final_chunk)  # fmt: skip
    finally:
        env.close()


def _run(env, env_id, agent_name, episodes, seed, out, config, env_kwargs, agent_kwargs,
         final_eval, final_images, final_n, final_n0, final_alpha, progress, tensorboard,
         final_chunk=None):  # fmt: skip
    from arq_gym import __version__
    from arq_gym import agents as agents_mod

    agent = agents_mod.make(agent_name, env, seed=seed, **agent_kwargs)
    state = _read_state(out / "state.pkl")
    if state is not None and len(state["records"]) > episodes:
        raise SearchError(f"the run in {out} already has {len(state['records'])} episodes; "
                          f"--episodes {episodes} would drop some")  # fmt: skip
    problem = _env_problem(env)
    layers = _env_layers(env)

    out.mkdir(parents=True, exist_ok=True)
    run_info = dict(config)
    run_info["arq_gym_version"] = __version__
    if problem is not None and hasattr(problem, "describe"):
        run_info["problem"] = problem.describe()
    atomic_write_text(out / "run.json", dumps(run_info))

    if state is not None:
        agent.load_state_dict(state["agent"])
        records: list[dict] = list(state["records"])
        elapsed = float(state["seconds"])
    else:
        records, elapsed = [], 0.0
    radii = _radii(records)
    # the checkpoint is the truth: drop CSV rows of episodes it does not hold, add missing ones
    atomic_write_text(out / "episodes.csv", _csv_text(records, radii))

    remaining = episodes - len(records)
    # a resumed run that was already complete rewrites neither its checkpoint nor its event files
    finished = remaining <= 0 and state is not None and bool(state.get("complete"))
    writer = None
    if tensorboard and not finished:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tb"), purge_step=len(records) + 1 if records else None)

    from tqdm.auto import tqdm

    bar = tqdm(total=episodes, initial=min(len(records), episodes), desc=f"{agent_name} {env_id}",
               unit="ep", disable=not progress, file=sys.stderr, dynamic_ncols=True)  # fmt: skip
    best = _first_best(records)
    pending: list[dict] = []
    t_session = time.perf_counter()
    t_last = [time.perf_counter()]

    def record(reward: float, info: dict) -> None:
        nonlocal best, radii
        now = time.perf_counter()
        if not math.isfinite(float(reward)):
            raise RuntimeError(f"episode {len(records) + 1}: reward {reward!r} is not finite")
        best_reward = reward if best is None else max(best["reward"], float(reward))
        rec = _record(len(records) + 1, reward, info, now - t_last[0], best_reward)
        t_last[0] = now
        records.append(rec)
        pending.append(rec)
        if best is None or rec["reward"] > best["reward"]:
            best = rec
        if not radii:
            radii = _radii(records)

    def checkpoint() -> None:
        if not pending:
            return
        done = dict(format=STATE_FORMAT, config=config, records=records,
                    seconds=elapsed + time.perf_counter() - t_session,
                    agent=agent.state_dict(), complete=len(records) >= episodes)  # fmt: skip
        atomic_write_bytes(out / "state.pkl", pickle.dumps(done, protocol=pickle.HIGHEST_PROTOCOL))
        if _csv_header_radii(out / "episodes.csv") != radii:
            # the first records fixed the certified-accuracy columns: rewrite with them
            atomic_write_text(out / "episodes.csv", _csv_text(records, radii))
        else:
            with open(out / "episodes.csv", "a", newline="") as f:
                w = csv.writer(f, lineterminator="\n")
                for rec in pending:
                    w.writerow(_csv_row(rec, radii))
        if writer is not None:
            for rec in pending:
                _tb_scalars(writer, rec)
            writer.flush()
        bar.update(len(pending))
        bar.set_postfix(best=f"{best['reward']:.4g}", last=f"{pending[-1]['reward']:.4g}")
        pending.clear()

    try:
        if remaining > 0:
            agent.run(remaining, record, checkpoint)
            checkpoint()
    finally:
        bar.close()
    # a resumed run that had nothing left to do adds no time (its outputs stay byte-identical)
    seconds = elapsed + (time.perf_counter() - t_session if remaining > 0 else 0.0)
    if len(records) > episodes:  # an agent that ran past the target: keep the first N
        del records[episodes:]
        best = _first_best(records)
        atomic_write_text(out / "episodes.csv", _csv_text(records, radii))
    if not finished:
        final_state = dict(format=STATE_FORMAT, config=config, records=records, seconds=seconds,
                           agent=agent.state_dict(), complete=True)  # fmt: skip
        atomic_write_bytes(
            out / "state.pkl", pickle.dumps(final_state, protocol=pickle.HIGHEST_PROTOCOL)
        )
    agent.close()

    # best policy, figures
    result: dict[str, Any] = {
        "best_reward": best["reward"], "best_policy": str(out / "best_policy.json"),
        "best_episode": best["episode"], "w_bits": best["w_bits"], "a_bits": best["a_bits"],
        "episodes": len(records), "seconds": seconds,
        "evaluations": len(records), "cache_hits": sum(r["cache_hit"] for r in records),
        "env_id": env_id, "agent": agent_name, "seed": seed, "out": str(out),
    }  # fmt: skip
    metrics = {k: best[k] for k in ("reward", "acr", "clean_accuracy", "certified_accuracy",
                                    "abstain_rate", "episode")}  # fmt: skip
    metrics |= {"reward_name": best.get("reward_name"), "agent": agent_name, "seed": seed}
    if problem is not None:
        metrics["fidelity"] = problem.fidelity.key
        metrics["fp_acr"] = problem.fp_acr
    _write_policy(out / "best_policy.json", best, layers, problem, env_id, metrics)
    title = f"{agent_name} on {env_id} (seed {seed})"
    _plot_rewards(records, out / "reward.png", title)
    names = [lay.name for lay in layers] if layers else None
    if best["w_bits"]:
        fig = _bits_figure(best, names, f"best policy, episode {best['episode']}: "
                                        f"reward {best['reward']:.4g}")  # fmt: skip
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        atomic_write_bytes(out / "best_bits.png", buf.getvalue())
        if writer is not None:
            writer.add_figure("policy/best_bits", fig, global_step=len(records))
        else:
            import matplotlib.pyplot as plt

            plt.close(fig)
    if writer is not None:
        writer.close()

    # final evaluation on test images
    if final_eval:
        result["final"] = _final(out, problem, best, final_images, final_n, final_n0,
                                 final_alpha, env_kwargs, progress, final_chunk)  # fmt: skip
    atomic_write_text(out / "search.json", dumps(result))
    return result


def _first_best(records: Sequence[dict]) -> dict | None:
    best = None
    for r in records:
        if best is None or r["reward"] > best["reward"]:
            best = r
    return best


def _csv_header_radii(path: Path) -> list[str] | None:
    try:
        with open(path, newline="") as f:
            header = next(csv.reader(f))
    except (OSError, StopIteration):
        return None
    prefix = "certified_accuracy_"
    return [h[len(prefix) :] for h in header if h.startswith(prefix)]


def _tb_scalars(writer, rec: Mapping[str, Any]) -> None:
    step = rec["episode"]
    writer.add_scalar("search/reward", rec["reward"], step)
    writer.add_scalar("search/best_reward", rec["best_reward"], step)
    for key in ("acr", "clean_accuracy", "bops_fraction", "abstain_rate"):
        if math.isfinite(rec[key]):
            writer.add_scalar(f"metrics/{key}", rec[key], step)
    for r, v in rec["certified_accuracy"].items():
        writer.add_scalar(f"certified_accuracy/r{r}", v, step)
    writer.add_scalar("search/cache_hit", float(rec["cache_hit"]), step)


def _write_policy(path: Path, best: Mapping[str, Any], layers, problem, env_id: str,
                  metrics: dict) -> None:  # fmt: skip
    from arq_gym.policy import POLICY_FORMAT, Policy, save_policy

    if not best["w_bits"]:
        atomic_write_text(path, dumps({"format": POLICY_FORMAT, "env_id": env_id,
                                        "layers": [], "metrics": metrics}))  # fmt: skip
        return
    policy = Policy(tuple(best["w_bits"]), tuple(best["a_bits"]))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if layers:
        save_policy(tmp, policy, layers, env_id=env_id,
                    model=getattr(problem, "architecture", None),
                    dataset=getattr(problem, "dataset", None),
                    sigma=getattr(problem, "sigma", None), metrics=metrics)  # fmt: skip
        os.replace(tmp, path)
    else:
        doc = {"format": POLICY_FORMAT, "env_id": env_id, "model": None, "dataset": None,
               "sigma": None,
               "layers": [{"name": f"layer{i}", "w_bits": w, "a_bits": a, "macs": 0}
                          for i, (w, a) in enumerate(zip(policy.w_bits, policy.a_bits))],
               "bops_fraction": best["bops_fraction"], "metrics": metrics}  # fmt: skip
        atomic_write_text(path, dumps(doc))


def _final(out: Path, problem, best, images, n, n0, alpha, env_kwargs, progress,
           chunk=None) -> dict:  # fmt: skip
    path = out / "final.json"
    settings = {"images": images, "n": n, "n0": n0, "alpha": alpha}
    if path.is_file():
        with contextlib.suppress(Exception):
            doc = json.loads(path.read_text())
            if (
                doc.get("w_bits") == best["w_bits"]
                and doc.get("a_bits") == best["a_bits"]
                and all(doc.get(k) == v for k, v in settings.items())
            ):
                return _final_summary(doc)
    if problem is None:
        doc = {"skipped": "the env exposes no quantization problem (env.unwrapped.problem)"}
        atomic_write_text(path, dumps(doc))
        return doc
    doc = final_evaluation(problem, best["w_bits"], best["a_bits"], images=images, n=n, n0=n0,
                           alpha=alpha, data_dir=env_kwargs.get("data_dir"),
                           seed=int(getattr(problem, "seed", 0)), progress=progress,
                           out=out, chunk=chunk)  # fmt: skip
    doc["search_reward"] = best["reward"]
    doc["search_episode"] = best["episode"]
    atomic_write_text(path, dumps(doc))
    import shutil

    shutil.rmtree(out / "final.parts", ignore_errors=True)  # finished: the chunks are in final.json
    return _final_summary(doc)


def _final_summary(doc: Mapping[str, Any]) -> dict:
    if "quantized" not in doc:
        return dict(doc)
    q, fp = doc["quantized"], doc["fp32"]
    return {
        "images": doc["images"], "n": doc["n"], "bops_fraction": doc["bops_fraction"],
        "acr": q["acr"], "clean_accuracy": q["clean_accuracy"],
        "certified_accuracy": q["certified_accuracy"],
        "fp32_acr": fp["acr"], "fp32_clean_accuracy": fp["clean_accuracy"],
        "fp32_certified_accuracy": fp["certified_accuracy"],
    }  # fmt: skip
