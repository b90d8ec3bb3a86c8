"""Searches run side by side, for ``arq-gym benchmark``, ``table`` and ``pareto``.

:func:`run_searches` runs a list of search jobs (keyword arguments of
:func:`arq_gym.experiments.search.search`) on a backend:

* ``"local"``: in this process (``workers=1``) or in a pool of ``spawn`` worker processes,
  each with :func:`arq_gym.threads.worker_threads` torch threads;
* ``"ray"`` (``pip install -e ".[ray]"``): one Ray task per search, declaring the CPUs it
  needs (``cpus_per_search``, default :func:`~arq_gym.threads.worker_threads` of ``workers``)
  and a GPU when the env asks for ``device="cuda"``; ``ray_address`` joins a running cluster
  (``"auto"`` after ``ray start --head``), None starts a local one. A task whose worker dies
  is retried (``max_retries``) and, since every search checkpoints after each episode and is
  run with ``resume=True``, continues from its last completed episode: no episode is
  repeated or lost in ``episodes.csv``. For a cluster, the output folder and the ``cache_dir``
  of the env must be on a file system every node sees (the evaluation cache is one small
  file per policy, written atomically, so the searches share it).

Before any worker starts, the env is made once in the driver, so that its one-time work (the
FP32 network's IRS cache in ``cache_dir``) is not done by every worker at once. Results do not
depend on the backend: a search's episodes depend on its seed and settings only.
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


BACKENDS = ("local", "ray")


def run_searches(jobs: Sequence[dict], workers: int = 1, *, prepare: tuple | None = None,
                 progress: bool = True, desc: str = "searches", total: int | None = None,
                 done: int = 0, backend: str = "local", ray_address: str | None = None,
                 cpus_per_search: float | None = None,
                 max_retries: int = 3) -> tuple[dict[str, dict], list[dict]]:  # fmt: skip
    """Run ``jobs`` (each ``{"run": name, "search": search() keyword arguments}``) on
    ``backend``; returns ``(results by run name, errors)``. ``prepare`` is ``(env_id,
    env_kwargs)`` to make once before workers start; ``total``/``done`` size the progress
    bar."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
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
        if backend == "ray" and jobs:
            _run_on_ray(jobs, workers, prepare, collect, ray_address, cpus_per_search,
                        max_retries)  # fmt: skip
        elif workers == 1 or len(jobs) <= 1:
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


def _run_on_ray(jobs, workers, prepare, collect, address, cpus, max_retries) -> None:
    """One Ray task per search (see the module docstring)."""
    try:
        import ray
    except ModuleNotFoundError:
        raise ValueError("--backend ray needs Ray: pip install -e \".[ray]\"") from None
    from arq_gym.threads import worker_threads

    if prepare is not None:
        _prepare(*prepare)
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)  # fmt: skip
    cpus = float(cpus or worker_threads(max(1, workers)))
    env_kwargs = prepare[1] if prepare is not None else {}
    gpus = 1 if str(env_kwargs.get("device", "")).startswith("cuda") else 0
    task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=max_retries)(_ray_job)
    pending = {task.remote(job, int(cpus)): job["run"] for job in jobs}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        run = pending.pop(ready[0])
        try:
            collect(ray.get(ready[0]))
        except Exception as exc:  # noqa: BLE001 - a task that failed after its retries
            collect({"error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}", "run": run})


def _ray_job(job: dict, threads: int) -> dict:
    """A search as a Ray task: the declared CPUs as torch threads, then :func:`_run_job`."""
    _worker_init(max(1, threads))
    return _run_job(job)
