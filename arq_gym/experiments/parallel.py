"""Searches run side by side: the local backend of ``arq-gym benchmark`` and ``arq-gym pareto``.

:func:`run_searches` runs a list of search jobs (keyword arguments of
:func:`arq_gym.experiments.search.search`) in this process (``workers=1``) or in a pool of
``spawn`` worker processes, each with :func:`arq_gym.threads.worker_threads` torch threads.
Before the pool starts, the env is made once in the parent, so that its one-time work (the
FP32 network's IRS cache in ``cache_dir``) is not done by every worker at once. Every search
checkpoints after each episode, so an interrupted run continues with ``resume=True``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

from arq_gym.experiments.search import search

__all__ = ["run_searches"]


def _prepare(env_id: str, env_kwargs: Mapping[str, Any]) -> None:
    import gymnasium as gym

    env = gym.make(env_id, **env_kwargs)
    env.close()


def _worker_init(threads: int) -> None:
    from arq_gym.threads import set_threads

    set_threads(threads, export=True)  # exported: processes a worker starts inherit it


def _run_job(job: dict) -> dict:
    """One search (in a worker process); returns its result or ``{"error": message}``."""
    try:
        res = search(**job["search"])
    except Exception as exc:  # noqa: BLE001 - reported in the parent
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return {"error": f"{type(exc).__name__}: {msg}", "run": job["run"]}
    res["run"] = job["run"]
    return res


def run_searches(jobs: Sequence[dict], workers: int = 1, *, prepare: tuple | None = None,
                 progress: bool = True, desc: str = "searches", total: int | None = None,
                 done: int = 0) -> tuple[dict[str, dict], list[dict]]:  # fmt: skip
    """Run ``jobs`` (each ``{"run": name, "search": search() keyword arguments}``); returns
    ``(results by run name, errors)``. ``prepare`` is ``(env_id, env_kwargs)`` to make once
    before a pool starts; ``total``/``done`` size the progress bar."""
    from tqdm.auto import tqdm

    results: dict[str, dict] = {}
    errors: list[dict] = []
    bar = tqdm(total=len(jobs) + done if total is None else total, initial=done, desc=desc,
               unit="run", disable=not progress)  # fmt: skip

    def collect(res: dict) -> None:
        if "error" in res:
            errors.append(res)
        else:
            results[res["run"]] = res
        bar.update(1)

    try:
        if workers == 1 or len(jobs) <= 1:
            for job in jobs:
                job["search"]["progress"] = progress
                collect(_run_job(job))
        else:
            import multiprocessing as mp

            from arq_gym.threads import worker_threads

            if prepare is not None:
                _prepare(*prepare)
            processes = min(workers, len(jobs))
            with ProcessPoolExecutor(max_workers=processes, mp_context=mp.get_context("spawn"),
                                     initializer=_worker_init,
                                     initargs=(worker_threads(processes),)) as pool:  # fmt: skip
                for fut in as_completed([pool.submit(_run_job, job) for job in jobs]):
                    collect(fut.result())
    finally:
        bar.close()
    return results, errors
