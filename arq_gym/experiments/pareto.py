"""Pareto fronts over budgets: certified robustness against bit operations (``arq-gym pareto``).

:func:`pareto` runs one search per budget (the same agent, seed and env settings; the searches
run side by side on the chosen backend, :mod:`arq_gym.experiments.parallel`), then certifies
every best policy, the uniform policies and the FP32 network the same way on the same test
images (full CERTIFY, as :mod:`arq_gym.experiments.table` does). Output folder::

    pareto.json            settings and the command
    searches/<budget>/     one search per budget (episodes.csv, best_policy.json, ...)
    certs/<point>.json     each point's certificate (and .tsv, Cohen's layout)
    front.csv, front.md    every point: BOPs share, ACR with its 95% interval, clean and
                           certified accuracy, bits; the searched points that no other point
                           beats on both BOPs and ACR are marked as the front
    front.png              ACR and clean accuracy against the BOPs share (log scale), FP32 line
    results.json           everything in one object

Searches checkpoint every episode and certifications every ``chunk`` images: ``resume=True``
continues where it stopped.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from arq_gym.experiments.search import (
    SearchError,
    finished_search,
    make_env,
    recorded_env_kwargs,
)
from arq_gym.files import atomic_write_bytes, atomic_write_text, dumps

__all__ = ["UNIFORM_BITS", "budget_label", "pareto"]

PARETO_FORMAT = "arq-pareto/1"
#: the uniform bit-widths certified beside the searched policies
UNIFORM_BITS = (8, 6, 5, 4, 3)
RADII = ("0.25", "0.5", "0.75")
CSV_FIELDS = ["point", "kind", "budget", "bops_percent", "acr", "acr_low", "acr_high",
              "clean_accuracy", "certified_accuracy_0.25", "certified_accuracy_0.5",
              "certified_accuracy_0.75", "on_front", "search_reward", "w_bits",
              "a_bits"]  # fmt: skip


def budget_label(budget: float) -> str:
    """``"1/64"`` for a budget that is one over an integer, else the number (``"0.02"``)."""
    frac = Fraction(budget).limit_denominator(100_000)
    return f"1/{frac.denominator}" if frac.numerator == 1 else f"{budget:g}"


def pareto(
    env_id: str,
    agent: str,
    budgets: Sequence[float | str],
    episodes: int,
    out: str | os.PathLike,
    *,
    seed: int = 0,
    env_kwargs: Mapping[str, Any] | None = None,
    agent_kwargs: Mapping[str, Any] | None = None,
    uniform_bits: Sequence[int] = UNIFORM_BITS,
    images: int = 500,
    n: int = 10_000,
    n0: int = 100,
    alpha: float = 0.001,
    chunk: int = 25,
    workers: int = 1,
    resume: bool = False,
    progress: bool = True,
    command: str | None = None,
    backend: str = "local",
    ray_address: str | None = None,
) -> dict:
    """Build (or finish) the front in ``out``; returns ``results.json``'s content.

    ``budgets``: fractions of the FP32 BOPs (``"1/64"`` or numbers), one search each;
    ``uniform_bits``: the uniform policies certified beside them (first and last layers as the
    env pins them). ``workers``, ``backend``, ``ray_address``: where the searches run
    (:func:`arq_gym.experiments.parallel.run_searches`). SearchError (one line) for bad input;
    RuntimeError if searches failed.
    """
    from arq_gym.budget import parse_budget
    from arq_gym.experiments.parallel import run_searches
    from arq_gym.experiments.table import Row, _certify_row, _test_images, check_out
    from arq_gym.policy import MAX_BITS, MIN_BITS, Policy
    from arq_gym.smoothing import Certificate

    try:
        values = sorted({parse_budget(b) for b in budgets}, reverse=True)
    except ValueError as exc:
        raise SearchError(str(exc)) from None
    if not values:
        raise SearchError("give at least one budget (--budgets 1/16,1/32,1/64)")
    for name, v in (("episodes", episodes), ("images", images), ("n", n), ("n0", n0),
                    ("chunk", chunk), ("workers", workers)):  # fmt: skip
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise SearchError(f"--{name} must be a positive integer, got {v!r}")
    bad = [b for b in uniform_bits if not MIN_BITS <= int(b) <= MAX_BITS]
    if bad:
        raise SearchError(f"--uniform-bits must lie in [{MIN_BITS}, {MAX_BITS}], got {bad}")
    if "budget" in (env_kwargs or {}) or "reward" in (env_kwargs or {}):
        raise SearchError("the front sets the budget per search and the env's reward stays; "
                          "do not pass budget or reward in --env-kwargs")  # fmt: skip
    out = Path(out)
    env_kwargs = dict(env_kwargs or {})
    env_kwargs.setdefault("cache_dir", str(out / "cache"))
    cert_settings = {"images": int(images), "n": int(n), "n0": int(n0), "alpha": float(alpha)}
    settings = json.loads(dumps({
        "env_id": env_id, "agent": agent, "seed": int(seed), "episodes": int(episodes),
        "budgets": values, "uniform_bits": sorted({int(b) for b in uniform_bits}, reverse=True),
        "env_kwargs": recorded_env_kwargs(env_kwargs),
        "agent_kwargs": dict(agent_kwargs or {}), **cert_settings,
    }))  # fmt: skip
    check_out(out, settings, resume, "pareto.json", "Pareto front")
    env = make_env(env_id, env_kwargs)
    problem = getattr(env.unwrapped, "problem", None)
    env.close()
    if problem is None:
        raise SearchError(f"env {env_id!r} exposes no quantization problem")
    *data, stride = _test_images(problem, images, env_kwargs.get("data_dir"))
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    meta_path = out / "pareto.json"
    if meta_path.is_file():
        started = json.loads(meta_path.read_text()).get("started", started)
    atomic_write_text(meta_path, dumps({"format": PARETO_FORMAT, "settings": settings,
                                        "command": command, "started": started}))  # fmt: skip

    # one search per budget, side by side
    jobs, searches = [], {}
    for b in values:
        run = budget_label(b)
        run_dir = out / "searches" / run.replace("/", "-")
        done = finished_search(run_dir, episodes)
        if done is not None:
            searches[run] = done
            continue
        jobs.append({"run": run, "search": dict(
            env_id=env_id, agent=agent, episodes=episodes, seed=seed, out=str(run_dir),
            env_kwargs={**env_kwargs, "budget": b}, agent_kwargs=dict(agent_kwargs or {}),
            resume=True, final_eval=False, progress=False)})  # fmt: skip
    found, errors = run_searches(jobs, workers, prepare=(env_id, env_kwargs), progress=progress,
                                 desc="pareto searches", total=len(values),
                                 done=len(searches), backend=backend,
                                 ray_address=ray_address)  # fmt: skip
    searches.update(found)

    # every point certified alike
    points = [("fp32", "fp32", None, None, None)]
    points += [(f"w{b}a{b}", "uniform", None,
                Policy.uniform(problem.num_layers, b, keep_first_last=problem.keep_first_last),
                None) for b in settings["uniform_bits"]]  # fmt: skip
    for b in values:
        res = searches.get(budget_label(b))
        if res is not None:
            points.append((f"{agent}@{budget_label(b)}", "search", b,
                           Policy(tuple(res["w_bits"]), tuple(res["a_bits"])), res))  # fmt: skip
    rows = []
    for name, kind, budget, policy, res in points:
        doc = _certify_row(Row(name, name, kind), policy, problem, data, cert_settings, out,
                           chunk, progress)  # fmt: skip
        s = doc["summary"]
        low, high = Certificate.from_dict(doc["certificate"]).acr_interval()
        rows.append({
            "point": name, "kind": kind, "budget": budget,
            "bops_percent": 100.0 * doc["bops_fraction"], "acr": s["acr"], "acr_low": low,
            "acr_high": high, "clean_accuracy": s["clean_accuracy"],
            **{f"certified_accuracy_{r}": s["certified_accuracy"][r] for r in RADII},
            "search_reward": None if res is None else res["best_reward"],
            "w_bits": doc["w_bits"], "a_bits": doc["a_bits"],
        })  # fmt: skip
    _mark_front(rows)
    result = _write(out, settings, rows, problem, command, started, stride)
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(values)} searches failed; first: "
                           f"{errors[0]['run']}: {errors[0]['error']}")  # fmt: skip
    return result


def _mark_front(rows: list[dict]) -> None:
    """``on_front``: no other point has at most the BOPs and more ACR (or less BOPs, same ACR)."""
    for r in rows:
        r["on_front"] = not any(
            o is not r and o["bops_percent"] <= r["bops_percent"] and o["acr"] >= r["acr"]
            and (o["bops_percent"] < r["bops_percent"] or o["acr"] > r["acr"])
            for o in rows
        )  # fmt: skip


def _plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, FuncFormatter

    def minor_label(x: float, _pos: int) -> str:  # 2, 3 and 5 times a power of ten only
        mantissa = x / 10 ** math.floor(math.log10(x) + 1e-9)
        return f"{x:g}" if round(mantissa) in (2, 3, 5) else ""

    fp = next((r for r in rows if r["kind"] == "fp32"), None)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, name in ((axes[0], "acr", "ACR"), (axes[1], "clean_accuracy",
                                                     "smoothed clean accuracy")):  # fmt: skip
        for kind, style in (("search", dict(marker="o", linestyle="-", color="#1f77b4")),
                            ("uniform", dict(marker="s", linestyle=":", color="#ff7f0e"))):  # fmt: skip
            pts = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["bops_percent"])
            if pts:
                ax.plot([r["bops_percent"] for r in pts], [r[key] for r in pts], label=kind,
                        **style)  # fmt: skip
                for r in pts:
                    ax.annotate(r["point"].split("@")[-1], (r["bops_percent"], r[key]),
                                fontsize=7, textcoords="offset points", xytext=(3, 3))  # fmt: skip
        if key == "acr":
            srch = [r for r in rows if r["kind"] == "search"]
            ax.errorbar([r["bops_percent"] for r in srch], [r["acr"] for r in srch],
                        yerr=[[r["acr"] - r["acr_low"] for r in srch],
                              [r["acr_high"] - r["acr"] for r in srch]],
                        fmt="none", ecolor="#1f77b4", alpha=0.5)  # fmt: skip
        if fp is not None:
            ax.axhline(fp[key], color="black", linestyle="--", linewidth=1, label="FP32")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(FuncFormatter(minor_label))
        ax.set_xlabel("BOPs, % of FP32 (log scale)")
        ax.set_ylabel(name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _write(out: Path, settings: dict, rows: list[dict], problem, command, started,
           stride: int) -> dict:  # fmt: skip
    from arq_gym.experiments.table import machine_description

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({**r, "w_bits": " ".join(map(str, r["w_bits"] or [])),
                    "a_bits": " ".join(map(str, r["a_bits"] or []))})  # fmt: skip
    atomic_write_text(out / "front.csv", buf.getvalue())
    title = (f"{problem.architecture} on {problem.dataset}, sigma {problem.sigma:g}: "
             f"{settings['agent']} searches ({settings['episodes']} episodes) per budget")  # fmt: skip
    _plot(rows, out / "front.png", title)
    lines = [
        f"# {title}",
        "",
        f"Every point: full CERTIFY on {settings['images']} test images (every {stride}th), "
        f"n0 = {settings['n0']}, n = {settings['n']:,}, alpha = {settings['alpha']}, the same "
        "noise for every point; ACR intervals: 95% BCa bootstrap over the images. Front: no "
        "other point has at most the BOPs and more ACR.",
        "",
        "| point | BOPs (% of FP32) | ACR [95% interval] | clean acc. | r=0.25 | r=0.5 | r=0.75 "
        "| front |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: -r["bops_percent"]):
        lines.append(
            f"| {r['point']} | {r['bops_percent']:.3f} | {r['acr']:.3f} [{r['acr_low']:.3f}, "
            f"{r['acr_high']:.3f}] | {100 * r['clean_accuracy']:.1f} | "
            f"{100 * r['certified_accuracy_0.25']:.1f} | {100 * r['certified_accuracy_0.5']:.1f} "
            f"| {100 * r['certified_accuracy_0.75']:.1f} | {'yes' if r['on_front'] else ''} |"
        )
    lines += ["", f"Command: `{command or 'arq_gym.experiments.pareto.pareto(...)'}`",
              f"Started {started}.", ""]  # fmt: skip
    atomic_write_text(out / "front.md", "\n".join(lines))
    result = {"format": PARETO_FORMAT, "settings": settings, "command": command,
              "started": started, "machine": machine_description(), "points": rows,
              "front": str(out / "front.md")}  # fmt: skip
    atomic_write_text(out / "results.json", dumps(result))
    return result
