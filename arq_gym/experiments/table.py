"""The paper-style results table: the FP32 network, uniform bit-widths and searched policies,
every row certified the same way on the same test images.

:func:`results_table` is what ``arq-gym table`` runs. Each searched row runs
:func:`arq_gym.experiments.search.search` at the env's fidelity (validation images); then every row's
network is certified with full CERTIFY (Cohen et al.; not IRS) on ``images`` evenly spaced
*test* images, which the searches never saw. Layout of the output folder::

    table.json            settings and the command that made the table
    searches/<row>/       one search per searched row (episodes.csv, best_policy.json, tb/, ...)
    cache/                the persistent evaluation cache the searches share
    certs/<row>.json      the row's certificate (summary, per-image arrays, policy, function)
    certs/<row>.tsv       per-image table in the layout of Cohen et al.
    certs/<row>.parts/    finished chunks of a certification still in progress
                          (:func:`arq_gym.smoothing.certify_chunked`)
    table.md, table.csv   the table; results.json: everything in one object

Everything is resumable: searches checkpoint every episode, certifications every ``chunk``
images (the noise of image ``i`` depends on ``i`` only, so chunking changes nothing), and a
rerun with ``resume=True`` skips what is finished.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import io
import json
import os
import platform
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from arq_gym.experiments.search import SearchError, make_env, recorded_env_kwargs, search
from arq_gym.files import atomic_write_text, dumps

__all__ = ["STANDARD_ROWS", "Row", "parse_rows", "results_table"]

TABLE_FORMAT = "arq-table/1"
CERT_FORMAT = "arq-table-cert/1"
RADII = ("0.25", "0.5", "0.75")


@dataclass(frozen=True)
class Row:
    """One row of the table: the FP32 network, a uniform bit-width or a search."""

    name: str
    label: str
    kind: str  # "fp32", "uniform", "search" or "nipq"
    bits: int | None = None
    agent: str | None = None
    reward: str | None = None
    finetuned: bool = False  # the row's policy after quantization-aware fine-tuning

    def tuned(self, epochs: int) -> Row:
        """The fine-tuned variant of this quantized row (``<name>+ft``)."""
        return Row(f"{self.name}+ft", f"{self.label}, fine-tuned {epochs} ep.", self.kind,
                   self.bits, self.agent, self.reward, finetuned=True)  # fmt: skip


STANDARD_ROWS = {
    "fp32": Row("fp32", "FP32", "fp32"),
    "w8a8": Row("w8a8", "uniform W8A8", "uniform", bits=8),
    "w4a4": Row("w4a4", "uniform W4A4", "uniform", bits=4),
    "haq": Row("haq", "HAQ-style search (reward clean_accuracy)", "search", agent="arq-ddpg",
               reward="clean_accuracy"),  # fmt: skip
    "arq": Row("arq", "ARQ search (reward acr)", "search", agent="arq-ddpg", reward="acr"),
    "random": Row("random", "random search (reward acr)", "search", agent="random", reward="acr"),
    "nipq": Row("nipq", "NIPQ (learned bits)", "nipq"),
}
DEFAULT_ROWS = ("fp32", "w8a8", "w4a4", "haq", "arq", "random")


def parse_rows(names: str | Sequence[str]) -> list[Row]:
    """Rows by name: the standard ones (``fp32, w8a8, w4a4, haq, arq, random, nipq``) or any agent
    name (an ACR search by that agent, e.g. ``sb3-ppo``). ValueError for an unknown name."""
    from arq_gym import agents as agents_mod

    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    rows = []
    for name in names:
        if name in STANDARD_ROWS:
            rows.append(STANDARD_ROWS[name])
            continue
        try:
            agents_mod.get(name)
        except Exception as exc:
            raise SearchError(f"unknown row {name!r}: not one of {', '.join(STANDARD_ROWS)} and "
                              f"not an agent ({str(exc).splitlines()[0]})") from None  # fmt: skip
        rows.append(Row(name, f"{name} search (reward acr)", "search", agent=name, reward="acr"))
    if not rows:
        raise SearchError("no rows given")
    if len({r.name for r in rows}) != len(rows):
        raise SearchError("a row is named twice")
    return rows


def machine_description() -> dict:
    """CPU model, cores, torch threads and versions (no paths, no host name)."""
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(Exception):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}  # fmt: skip


# ---------------------------------------------------------------------- certification


def _certify_row(row: Row, policy, problem, data, settings: dict, out: Path, chunk: int,
                 progress: bool, tuned: Path | None = None, data_dir=None) -> dict:  # fmt: skip
    """The row's certificate document (computed, or read back when already finished).

    ``tuned``: a quantized checkpoint (``arq-gym finetune``, ``arq-gym nipq``) whose network
    is certified instead of the problem's post-training quantization of ``policy``; it runs
    on the problem's execution backend."""
    from arq_gym.cost import bops_fraction
    from arq_gym.smoothing import certify_chunked

    path = out / "certs" / f"{row.name}.json"
    w_bits = None if policy is None else list(policy.w_bits)
    a_bits = None if policy is None else list(policy.a_bits)
    checkpoint = problem.checkpoint_sha256
    if tuned is not None:
        from arq_gym.data.download import sha256_of

        checkpoint = sha256_of(tuned)
    function = "fp32" if policy is None else problem.function_id
    ident = {"row": row.name, "w_bits": w_bits, "a_bits": a_bits, "function": function,
             "checkpoint_sha256": checkpoint, "sigma": problem.sigma,
             "seed": problem.seed, **settings}  # fmt: skip
    if path.is_file():
        with contextlib.suppress(Exception):
            doc = json.loads(path.read_text())
            if doc.get("format") == CERT_FORMAT and doc.get("ident") == ident:
                return doc
    if policy is None:  # compiled on a CPU: the same network, rounded differently (its doc says)
        net = problem.fp32_network(len(data[0]) * (settings["n0"] + settings["n"]))
        function = getattr(net, "function_id", "fp32")
    elif tuned is not None:
        net = _tuned_network(problem, tuned, policy, data_dir)
        function = ident["function"] = net.function_id
    else:
        problem.quantized.apply(policy)
        net = problem.quantized
    x, y, idx = data
    _announce_row(row, net, x, idx, ident, problem, settings, out, chunk)
    cert = certify_chunked(net, x, y, problem.sigma, parts_dir=out / "certs" / f"{row.name}.parts",
                           ident=ident, chunk=chunk, image_keys=idx, progress=progress,
                           desc=f"certify {row.name}", n0=settings["n0"], n=settings["n"],
                           alpha=settings["alpha"], batch_size=problem.batch_size,
                           seed=problem.seed, device=problem.device,
                           num_classes=problem.num_classes)  # fmt: skip
    cert.to_tsv(out / "certs" / f"{row.name}.tsv")
    frac = 1.0 if policy is None else float(bops_fraction(problem.layers, policy))
    doc = {"format": CERT_FORMAT, "ident": ident, "row": row.name, "label": row.label,
           "function": function, "w_bits": w_bits, "a_bits": a_bits, "bops_fraction": frac,
           "summary": cert.summary(), "certificate": cert.to_dict()}  # fmt: skip
    atomic_write_text(path, dumps(doc))
    shutil.rmtree(out / "certs" / f"{row.name}.parts", ignore_errors=True)
    return doc


def _tuned_network(problem, checkpoint: Path, policy, data_dir=None):
    """The network of a quantized checkpoint, on the problem's device and backend."""
    from arq_gym import data as data_mod
    from arq_gym.models import load_checkpoint
    from arq_gym.quant import QuantizedModel, calibration_images

    model, meta = load_checkpoint(checkpoint)
    record = meta.get("quantization")
    if not record or (record["w_bits"], record["a_bits"]) != (list(policy.w_bits),
                                                                list(policy.a_bits)):  # fmt: skip
        raise SearchError(f"{checkpoint} is not the fine-tuned network of the row's policy")
    train = data_mod.load(problem.dataset, data_dir=data_dir).train
    calib = calibration_images(train, problem.calibration_images, seed=0)
    net = QuantizedModel(model, calib, problem.sigma, seed=0, quantization=record)
    net = net.to(problem.device).eval()
    backend = problem.quantized.backend + ("-compiled" if problem.quantized.compiled else "")
    if problem.device.type == "cpu":
        net.set_backend(backend)
    net.apply(policy)
    net.warm_up(problem.images[:1].expand(min(problem.batch_size, 64), *problem.images.shape[1:])
                .to(problem.device))  # fmt: skip
    return net


def _finetune_row(row: Row, policy, problem, out: Path, epochs: int, seed: int,
                  progress: bool, data_dir=None, extra: Mapping | None = None) -> dict:  # fmt: skip
    """Quantization-aware fine-tuning of a row's policy (``out/finetune/<row>/``, resumable)."""
    from arq_gym.finetune import FinetuneConfig, finetune

    folder = out / "finetune" / row.name
    resume = (folder / "resume.pt").exists() or (folder / "model.pt").exists()
    return finetune(problem.model, problem.meta, policy, folder,
                    FinetuneConfig(epochs=epochs, seed=seed, **dict(extra or {})),
                    data_dir=data_dir, resume=resume,
                    progress=progress, policy_source=f"table row {row.name}")  # fmt: skip


def nipq_epochs(epochs: int) -> tuple[int, int]:
    """NIPQ's (noise, hard) epochs for a training budget of ``epochs`` in all: a fifth (at
    least one) for the hard-quantization phase, as NIPQ's 40 + 3 scaled to a short budget."""
    hard = max(1, epochs // 5)
    return epochs - hard, hard


def _nipq_row(problem, out: Path, epochs: int, seed: int, progress: bool, data_dir=None,
              extra: Mapping | None = None) -> dict:  # fmt: skip
    """The NIPQ baseline at the problem's budget with ``epochs`` of training in all."""
    from arq_gym.nipq import NIPQConfig, nipq

    noise, hard = nipq_epochs(epochs)
    folder = out / "nipq"
    resume = any((folder / f).exists() for f in ("nipq_resume.pt", "nipq_phase1.pt",
                                                  "model.pt", "resume.pt"))  # fmt: skip
    cfg = NIPQConfig(epochs=noise, hard_epochs=hard, budget=problem.budget, seed=seed,
                     keep_first_last=problem.keep_first_last, **dict(extra or {}))  # fmt: skip
    return nipq(problem.model, problem.meta, folder, cfg, data_dir=data_dir, resume=resume,
                progress=progress)


def _announce_row(row: Row, net, x, idx, ident: dict, problem, settings: dict, out: Path,
                  chunk: int) -> None:  # fmt: skip
    """One line on stderr before a row's certification: forward passes to go, about how long
    (a rate measured on a few batches), where its chunks are saved."""
    from arq_gym.smoothing.chunked import (
        chunks_done,
        format_duration,
        forward_passes,
        measure_rate,
        say,
    )

    parts = out / "certs" / f"{row.name}.parts"
    images = settings["images"]
    done = chunks_done(parts, ident, images, chunk, idx)
    todo = forward_passes(images - done, settings["n0"], settings["n"])
    try:
        rate = measure_rate(net, x, problem.sigma, problem.batch_size, problem.device)
        eta = f"about {format_duration(todo / rate)} at {rate:,.0f} images/s measured here"
    except Exception as exc:  # noqa: BLE001 - an estimate only
        eta = f"time unknown ({type(exc).__name__})"
    resumed = f" ({done} of {images} images already done)" if done else ""
    say(f"table row {row.name}: full CERTIFY on {images} test images: {todo:,} forward passes "
        f"to go{resumed}, {eta}; saved every {chunk} images in {parts}")  # fmt: skip


def _test_images(problem, images: int, data_dir):
    import torch

    from arq_gym import data as data_mod
    from arq_gym.smoothing import evenly_spaced

    test = data_mod.load(problem.dataset, data_dir=data_dir).test
    if images > len(test):
        raise SearchError(f"--images {images} exceeds the {len(test)} test images")
    idx = evenly_spaced(len(test), images)
    sub = test.subset(idx)
    x = torch.from_numpy(np.ascontiguousarray(sub.x)).float().div_(255.0)
    y = np.asarray(sub.y, dtype=np.int64)
    return x, y, idx, len(test) // images


# ---------------------------------------------------------------------- the table


def check_out(out: Path, settings: dict, resume: bool, meta_name: str = "table.json",
              what: str = "table") -> None:  # fmt: skip
    """Validate a results folder: empty unless ``resume``, and then holding ``meta_name`` with
    the same settings (``rows`` may differ: a resumed table can gain rows)."""
    meta = out / meta_name
    if out.exists() and not out.is_dir():
        raise SearchError(f"output path {out} exists and is not a folder")
    if not resume:
        if out.is_dir() and any(out.iterdir()):
            raise SearchError(f"output dir {out} is not empty; pass --resume to continue the "
                              f"{what} it holds or choose an empty --out")  # fmt: skip
        return
    if not meta.is_file():
        if out.is_dir() and any(out.iterdir()):
            raise SearchError(f"output dir {out} holds files but no {what} ({meta_name})")
        return
    prev = json.loads(meta.read_text()).get("settings", {})
    for key, value in settings.items():
        if key != "rows" and prev.get(key) != value:
            raise SearchError(f"output dir {out} holds a {what} with {key}={prev.get(key)!r}, "
                              f"not {value!r}; choose another --out")  # fmt: skip


def recorded_base_model(out: Path) -> str | None:
    """The sha256 of the base model a results folder's table was made with: from its
    table.json, or, for tables written before that was recorded, from its searches' run.json
    or the post-training rows' certificates; None for a new folder."""
    meta = out / "table.json"
    with contextlib.suppress(OSError, json.JSONDecodeError):
        sha = json.loads(meta.read_text()).get("checkpoint_sha256")
        if sha:
            return sha
    for run in sorted(out.glob("searches/*/run.json")):
        with contextlib.suppress(OSError, json.JSONDecodeError, AttributeError):
            sha = json.loads(run.read_text()).get("problem", {}).get("checkpoint_sha256")
            if sha:
                return sha
    for cert in sorted(out.glob("certs/*.json")):
        if "+ft" in cert.stem or cert.stem == "nipq":  # certified from a tuned checkpoint
            continue
        with contextlib.suppress(OSError, json.JSONDecodeError, AttributeError):
            sha = json.loads(cert.read_text()).get("ident", {}).get("checkpoint_sha256")
            if sha:
                return sha
    return None


def results_table(
    env_id: str,
    out: str | os.PathLike,
    *,
    rows: str | Sequence[str] = DEFAULT_ROWS,
    episodes: int = 200,
    seed: int = 0,
    env_kwargs: Mapping[str, Any] | None = None,
    agent_kwargs: Mapping[str, Any] | None = None,
    images: int = 500,
    n: int = 10_000,
    n0: int = 100,
    alpha: float = 0.001,
    chunk: int = 25,
    resume: bool = False,
    progress: bool = True,
    command: str | None = None,
    finetune_epochs: int | None = None,
    finetune_kwargs: Mapping[str, Any] | None = None,
    workers: int = 1,
    backend: str = "local",
    ray_address: str | None = None,
) -> dict:
    """Build (or finish) the table in ``out``; returns ``results.json``'s content.

    ``finetune_epochs``: every quantized row (uniform, searched) also appears fine-tuned
    (:func:`arq_gym.finetune.finetune`, this many epochs, in ``out/finetune/<row>/``) as row
    ``<row>+ft``, certified alike; it is also the training budget of the ``nipq`` row (noise
    and hard phases together, :func:`nipq_epochs`), which needs it. ``finetune_kwargs``: other
    :class:`~arq_gym.finetune.FinetuneConfig` fields for both (``lr``, ``train_images``, ...).
    ``workers``, ``backend``, ``ray_address``: the searched rows' searches run first, side by
    side there (:func:`arq_gym.experiments.parallel.run_searches`); training and certification
    follow in this process.

    ``rows``: names for :func:`parse_rows`. ``env_kwargs`` configure every search and the
    problem the rows are certified on (model, sigma, budget, fidelity, ...); a ``cache_dir``
    inside ``out`` is used unless one is given. ``images``, ``n``, ``n0``, ``alpha``: the
    certification of every row (full CERTIFY on evenly spaced test images). ``command``: the
    command line recorded in the table. SearchError (one line) for bad input.
    """
    from arq_gym.policy import Policy

    row_list = parse_rows(rows)
    for name, v in (("episodes", episodes), ("images", images), ("n", n), ("n0", n0),
                    ("chunk", chunk), ("workers", workers)):  # fmt: skip
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise SearchError(f"--{name} must be a positive integer, got {v!r}")
    if not 0 < alpha < 0.5:
        raise SearchError(f"--alpha must be in (0, 0.5), got {alpha!r}")
    if finetune_epochs is not None and (isinstance(finetune_epochs, bool) or not isinstance(
            finetune_epochs, (int, np.integer)) or finetune_epochs < 1):  # fmt: skip
        raise SearchError(f"--finetune-epochs must be a positive integer, got {finetune_epochs!r}")
    if any(r.kind == "nipq" for r in row_list) and (finetune_epochs or 0) < 2:
        raise SearchError("the nipq row trains: give its training budget with --finetune-epochs "
                          "E (E >= 2; the fine-tuned rows get the same E)")  # fmt: skip
    out = Path(out)
    env_kwargs = dict(env_kwargs or {})
    env_kwargs.setdefault("cache_dir", str(out / "cache"))
    if "reward" in env_kwargs:
        raise SearchError("the rows choose the reward; do not pass reward in --env-kwargs")
    cert_settings = {"images": int(images), "n": int(n), "n0": int(n0), "alpha": float(alpha)}
    settings = {"env_id": env_id, "episodes": int(episodes), "seed": int(seed),
                "env_kwargs": recorded_env_kwargs(env_kwargs),
                "agent_kwargs": dict(agent_kwargs or {}), **cert_settings,
                "rows": [r.name for r in row_list],
                "finetune_epochs": None if finetune_epochs is None else int(finetune_epochs),
                "finetune_kwargs": dict(finetune_kwargs or {})}  # fmt: skip
    settings = json.loads(dumps(settings))
    check_out(out, settings, resume)
    created = not out.exists()  # the env may write its cache into out: undo that on bad input
    try:
        env = make_env(env_id, env_kwargs)
        problem = getattr(env.unwrapped, "problem", None)
        env.close()
        if problem is None:
            raise SearchError(f"env {env_id!r} exposes no quantization problem")
        *data, stride = _test_images(problem, images, env_kwargs.get("data_dir"))
    except SearchError:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    base = recorded_base_model(out)
    if base is not None and base != problem.checkpoint_sha256:
        raise SearchError(f"output dir {out} holds a table of the base model {base[:16]}..., but "
                          f"the env now loads {problem.checkpoint_sha256[:16]}... (the shipped "
                          "model changed?); choose another --out")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    meta_path = out / "table.json"
    if meta_path.is_file():
        started = json.loads(meta_path.read_text()).get("started", started)
    atomic_write_text(meta_path, dumps({"format": TABLE_FORMAT, "settings": settings,
                                        "command": command, "started": started,
                                        "checkpoint_sha256": problem.checkpoint_sha256}))  # fmt: skip

    data_dir = env_kwargs.get("data_dir")
    jobs = _row_searches(row_list, env_id, env_kwargs, agent_kwargs, episodes, seed, out)
    if jobs and (workers > 1 or backend != "local"):
        _run_row_searches(jobs, env_id, env_kwargs, workers, backend, ray_address, progress)
    searches = {job["run"]: job["search"] for job in jobs}
    results = []
    for row in row_list:
        search_doc = train_doc = tuned = None
        if row.kind == "fp32":
            policy = None
        elif row.kind == "uniform":
            policy = Policy.uniform(problem.num_layers, row.bits, keep_first_last=problem.keep_first_last)
        elif row.kind == "nipq":
            train_doc = _nipq_row(problem, out, int(finetune_epochs), seed, progress, data_dir,
                                  finetune_kwargs)  # fmt: skip
            policy = Policy(tuple(train_doc["policy"]["w_bits"]), tuple(train_doc["policy"]["a_bits"]))
            tuned = out / "nipq" / "model.pt"
        else:
            search_doc = search(**{**searches[row.name], "progress": progress})
            policy = Policy(tuple(search_doc["w_bits"]), tuple(search_doc["a_bits"]))
        doc = _certify_row(row, policy, problem, data, cert_settings, out, chunk, progress,
                           tuned, data_dir)  # fmt: skip
        results.append(_row_result(row, doc, search_doc, train_doc))
        if finetune_epochs and row.kind in ("uniform", "search"):
            ft_doc = _finetune_row(row, policy, problem, out, int(finetune_epochs), seed,
                                   progress, data_dir, finetune_kwargs)  # fmt: skip
            ft_row = row.tuned(int(finetune_epochs))
            doc = _certify_row(ft_row, policy, problem, data, cert_settings, out, chunk,
                               progress, out / "finetune" / row.name / "model.pt", data_dir)  # fmt: skip
            results.append(_row_result(ft_row, doc, None, ft_doc))  # search counted once
    return _write_table(out, settings, results, problem, command, started, stride)


def _row_searches(row_list, env_id, env_kwargs, agent_kwargs, episodes, seed, out) -> list[dict]:
    """The search jobs of the searched rows (:func:`arq_gym.experiments.search.search`
    arguments), one per row."""
    return [{"run": row.name, "search": dict(
        env_id=env_id, agent=row.agent, episodes=episodes, seed=seed,
        out=str(out / "searches" / row.name), env_kwargs={**env_kwargs, "reward": row.reward},
        agent_kwargs=agent_kwargs, resume=True, final_eval=False, progress=False)}
        for row in row_list if row.kind == "search"]  # fmt: skip


def _run_row_searches(jobs, env_id, env_kwargs, workers, backend, ray_address,
                      progress) -> None:  # fmt: skip
    """Run the searched rows' searches side by side before the rows are certified."""
    from arq_gym.experiments.parallel import run_searches

    _found, errors = run_searches(jobs, workers, prepare=(env_id, env_kwargs), progress=progress,
                                  desc="table searches", backend=backend,
                                  ray_address=ray_address)  # fmt: skip
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(jobs)} searches failed; first: "
                           f"{errors[0]['run']}: {errors[0]['error']}")  # fmt: skip


def _row_result(row: Row, doc: dict, search_doc: dict | None,
                train_doc: dict | None = None) -> dict:  # fmt: skip
    from arq_gym.smoothing import Certificate

    s = doc["summary"]
    cert = Certificate.from_dict(doc["certificate"])
    low, high = cert.acr_interval()
    res = {"row": row.name, "label": row.label, "function": doc["function"],
           "clean_accuracy": s["clean_accuracy"], "acr": s["acr"], "acr_low": low,
           "acr_high": high,
           **{f"certified_accuracy_{r}": s["certified_accuracy"][r] for r in RADII},
           "bops_percent": 100.0 * doc["bops_fraction"], "w_bits": doc["w_bits"],
           "a_bits": doc["a_bits"], "certify_seconds": s["seconds"],
           "search_seconds": None, "search_reward": None, "search_episodes": None,
           "train_epochs": None, "train_seconds": None, "_certificate": cert}  # fmt: skip
    if search_doc is not None:
        res |= {"search_seconds": search_doc["seconds"], "search_reward": search_doc["best_reward"],
                "search_episodes": search_doc["episodes"], "agent": row.agent,
                "reward_name": row.reward}  # fmt: skip
    if train_doc is not None and row.kind == "nipq":
        res |= {"train_epochs": train_doc["noise_epochs"] + train_doc["hard_epochs"],
                "train_seconds": train_doc["seconds"],
                "learned_w_bits": train_doc["learned_w_bits"],
                "learned_a_bits": train_doc["learned_a_bits"],
                "bops_percent_before_enforcement": 100.0 * train_doc["rounded_bops_fraction"]}  # fmt: skip
    elif train_doc is not None:
        res |= {"train_epochs": train_doc["epochs"], "train_seconds": train_doc["seconds"],
                "val_noisy_acc_before": train_doc["val_noisy_acc_before"],
                "val_noisy_acc": train_doc["val_noisy_acc"]}  # fmt: skip
    return res


CSV_FIELDS = ["row", "label", "clean_accuracy", "certified_accuracy_0.25", "certified_accuracy_0.5",
              "certified_accuracy_0.75", "acr", "acr_low", "acr_high", "acr_percent_of_fp32",
              "acr_minus_fp32", "acr_minus_fp32_low", "acr_minus_fp32_high", "bops_percent",
              "function", "search_reward", "search_episodes", "search_seconds", "train_epochs",
              "train_seconds", "certify_seconds"]  # fmt: skip


def _write_table(out: Path, settings: dict, results: list[dict], problem, command, started,
                 stride: int) -> dict:  # fmt: skip
    from arq_gym.smoothing import paired_acr_difference

    hours = sum((r["search_seconds"] or 0.0) + (r["train_seconds"] or 0.0) + r["certify_seconds"]
                for r in results) / 3600  # fmt: skip
    fp = next((r for r in results if r["row"] == "fp32"), None)
    fp_acr = fp["acr"] if fp else None
    for r in results:  # how much of the FP32 network's certified robustness each row keeps
        r["acr_percent_of_fp32"] = 100.0 * r["acr"] / fp_acr if fp_acr else None
        diff = paired_acr_difference(r["_certificate"], fp["_certificate"]) if fp else None
        r["acr_minus_fp32"] = None if diff is None else diff["difference"]
        r["acr_minus_fp32_low"] = None if diff is None else diff["low"]
        r["acr_minus_fp32_high"] = None if diff is None else diff["high"]
    results = [{k: v for k, v in r.items() if k != "_certificate"} for r in results]
    machine = machine_description()
    fid = problem.fidelity
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(results)
    atomic_write_text(out / "table.csv", buf.getvalue())

    data_note = ("CIFAR-10 from its JPEG copy (lossy), so absolute figures are not those of the "
                 "lossless data" if problem.dataset == "cifar10" else problem.dataset)  # fmt: skip
    lines = [
        f"# {problem.architecture} on {problem.dataset}, sigma {problem.sigma:g}: "
        f"budget {100 * problem.budget:.4g}% of FP32 BOPs",
        "",
        f"Every row: full CERTIFY (Cohen et al.) on {settings['images']} test images (every "
        f"{stride}th), n0 = {settings['n0']}, n = {settings['n']:,}, "
        f"alpha = {settings['alpha']}, the same noise for every row. Searches ran "
        f"{settings['episodes']} episodes (seed {settings['seed']}) on {fid.images} validation "
        f"images at fidelity {fid.key!r} (IRS, n_p = {fid.n_p}); they never saw the test images.",
        f"Data: {data_note}.",
        "",
        "ACR intervals: 95% BCa bootstrap over the test images (the sampling uncertainty of the "
        "image sample); the difference to FP32 is paired (same images, same noise).",
        "",
        "| method | clean acc. | cert. acc. r=0.25 | r=0.5 | r=0.75 | ACR [95% interval] "
        "| ACR (% of FP32) | ACR - FP32 [95% interval] | BOPs (% of FP32) | training |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        keep = "" if r["acr_percent_of_fp32"] is None else f"{r['acr_percent_of_fp32']:.1f}"
        delta = "" if r["acr_minus_fp32"] is None or r["row"] == "fp32" else (
            f"{r['acr_minus_fp32']:+.3f} [{r['acr_minus_fp32_low']:+.3f}, "
            f"{r['acr_minus_fp32_high']:+.3f}]")  # fmt: skip
        train = "" if r["train_epochs"] is None else (
            f"{r['train_epochs']} ep., {r['train_seconds'] / 60:.0f} min")  # fmt: skip
        lines.append(
            f"| {r['label']} | {100 * r['clean_accuracy']:.1f} | "
            f"{100 * r['certified_accuracy_0.25']:.1f} | {100 * r['certified_accuracy_0.5']:.1f} | "
            f"{100 * r['certified_accuracy_0.75']:.1f} | {r['acr']:.3f} [{r['acr_low']:.3f}, "
            f"{r['acr_high']:.3f}] | {keep} | {delta} | {r['bops_percent']:.2f} | {train} |"
        )
    lines += ["", "Bits (weights / activations) and what was certified:", ""]
    for r in results:
        bits = "float" if r["w_bits"] is None else (
            f"w {','.join(map(str, r['w_bits']))} / a {','.join(map(str, r['a_bits']))}")  # fmt: skip
        extra = "" if r["search_reward"] is None else (
            f"; best search reward {r['search_reward']:.4f} after {r['search_episodes']} episodes")
        if r.get("learned_w_bits") is not None:
            learned = " ".join(f"{w:.1f}/{a:.1f}" for w, a in zip(r["learned_w_bits"],
                                                                  r["learned_a_bits"]))  # fmt: skip
            extra += (f"; learned bits (w/a, before rounding) {learned}, "
                      f"{r['bops_percent_before_enforcement']:.2f}% of FP32 BOPs after rounding, "
                      "before budget enforcement")  # fmt: skip
        lines.append(f"- {r['label']}: {bits}; function {r['function']}{extra}")
    lines += [
        "",
        f"Command: `{command or 'arq_gym.experiments.table.results_table(...)'}`",
        f"Started {started}; written {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; "
        f"compute {hours:.2f} hours (searches + training + certification, summed over sessions).",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} with "
        f"{machine['torch_threads']} threads" + (f", GPU {machine['gpu']}" if machine["gpu"] else "")
        + ".",
        "",
    ]
    atomic_write_text(out / "table.md", "\n".join(lines))
    result = {"format": TABLE_FORMAT, "settings": settings, "command": command,
              "started": started, "hours": hours, "machine": machine,
              "problem": {k: v for k, v in problem.describe().items() if k != "irs_cache"},
              "rows": results, "table": str(out / "table.md")}  # fmt: skip
    atomic_write_text(out / "results.json", dumps(result))
    return result


