"""How many torch threads each arq-gym process uses: one setting for every command and worker.

Certification is a stream of small convolutions; torch runs each one on all of its intra-op
threads (OpenMP), one per core by default. That is right on an idle machine and badly wrong
on a shared one: with other jobs on the same cores, every parallel region waits for its
slowest thread, and throughput collapses (issue 21: 1,733 s against 250 s for the same
certification on two busy cores). The setting is a number of threads *per process*:

* ``ARQ_GYM_THREADS=N`` in the environment (applied by ``import arq_gym``), or ``arq-gym CMD
  --threads N`` on the command line (the option wins and is exported to the environment, so
  that every process started from the command inherits it);
* unset: a process keeps torch's default (one thread per core) and a pool of ``W`` worker
  processes that arq-gym starts (``arq-gym benchmark --workers W``) gives each worker
  ``cores // W`` threads (:func:`worker_threads`).

Forked children (``multiprocessing``'s default start method on Linux up to Python 3.13, so
Gymnasium's ``AsyncVectorEnv`` by default, and SB3's ``SubprocVecEnv(start_method="fork")``)
are a special case. GNU OpenMP (libgomp,
torch's CPU backend) is not fork-safe: once the parent has run a parallel region with more
than one thread, a forked child that enters a parallel region with more than one thread
waits forever for pool threads that were not copied into it. ``import arq_gym`` therefore
registers an at-fork handler (:func:`install_fork_handler`) that sets the child's intra-op
threads to 1 before it can run anything, and :func:`set_threads` refuses more than one
thread in such a child. A vector-env worker that should use more threads needs a fresh
interpreter: ``vector_kwargs={"context": "spawn"}`` with ``ARQ_GYM_THREADS`` set (a
``"forkserver"`` server that imported arq-gym forks its children too, so they get one thread).
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator

__all__ = [
    "ENV_VAR",
    "ThreadsError",
    "configured_threads",
    "cores",
    "forked_child",
    "install_fork_handler",
    "limited_threads",
    "parse_threads",
    "set_threads",
    "use_configured_threads",
    "worker_threads",
]

#: the environment variable holding the number of torch threads per process
ENV_VAR = "ARQ_GYM_THREADS"

_FORKED_CHILD = False  # set in a child forked from a process that had imported torch
_HANDLER_INSTALLED = False


class ThreadsError(ValueError):
    """A thread count that is not a positive integer (the message is one line)."""


def parse_threads(value: object, source: str = ENV_VAR) -> int:
    """``value`` as a positive number of threads; :class:`ThreadsError` names ``source`` else.

    Accepts an ``int`` or a string of digits (surrounding spaces allowed); rejects 0,
    negatives, fractions, booleans and anything else.
    """
    if isinstance(value, bool):
        raise ThreadsError(f"{source} must be a positive integer, got {value!r}")
    if isinstance(value, int):
        n = value
    else:
        text = str(value).strip()
        try:
            n = int(text, 10)
        except ValueError:
            raise ThreadsError(f"{source} must be a positive integer, got {value!r}") from None
    if n < 1:
        raise ThreadsError(f"{source} must be a positive integer, got {value!r}")
    return n


def configured_threads() -> int | None:
    """The threads per process that ``ARQ_GYM_THREADS`` asks for; None when it is unset or
    empty. Raises :class:`ThreadsError` on a bad value."""
    raw = os.environ.get(ENV_VAR, "")
    if not raw.strip():
        return None
    return parse_threads(raw)


def cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def worker_threads(workers: int) -> int:
    """Torch threads for each of ``workers`` parallel worker processes: the configured
    setting when there is one, else ``cores() // workers`` (at least 1)."""
    n = configured_threads()
    if n is not None:
        return n
    return max(1, cores() // max(1, int(workers)))


def forked_child() -> bool:
    """True in a process forked (without exec) from one that had imported torch: OpenMP
    can use only one thread there (see the module docstring)."""
    return _FORKED_CHILD


def set_threads(n: int, export: bool = False) -> int:
    """Set torch's intra-op threads of this process to ``n`` and return the number set.

    In a forked child (:func:`forked_child`) more than one thread would deadlock in OpenMP,
    so the count is capped at 1 there. ``export=True`` also writes ``ARQ_GYM_THREADS`` into
    the environment, so that processes started from this one inherit the setting.
    """
    import torch

    n = parse_threads(n, "threads")
    if export:
        os.environ[ENV_VAR] = str(n)
    if _FORKED_CHILD:
        n = 1
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def use_configured_threads() -> int | None:
    """Apply ``ARQ_GYM_THREADS`` to this process if it is set (imports torch only then);
    returns the number applied, or None when unset. Raises :class:`ThreadsError` on a bad
    value."""
    n = configured_threads()
    if n is not None:
        set_threads(n)
    return n


@contextlib.contextmanager
def limited_threads(n: int = 1) -> Iterator[int]:
    """Run the block with at most ``n`` torch threads (never more than the process has, so
    the setting is honoured), then restore the previous count. Yields the count used.

    For the agents' small networks, where one thread beats several (see
    :func:`arq_gym.agents.base.torch_threads`)."""
    import torch

    old = torch.get_num_threads()
    use = max(1, min(int(n), old))
    if use == old:
        yield old
        return
    torch.set_num_threads(use)
    try:
        yield use
    finally:
        torch.set_num_threads(old)


def _after_fork_in_child() -> None:
    """At-fork handler: one OpenMP thread in a child forked from a torch-using process."""
    global _FORKED_CHILD
    torch = sys.modules.get("torch")
    if torch is None:  # no OpenMP runtime in the parent: nothing to protect
        return
    _FORKED_CHILD = True
    with contextlib.suppress(Exception):  # a half-imported torch: never break a fork
        torch.set_num_threads(1)


def install_fork_handler() -> None:
    """Register :func:`_after_fork_in_child` with :func:`os.register_at_fork` (once per
    process; ``import arq_gym`` calls it). Without ``register_at_fork`` (non-POSIX) there is
    no fork and nothing to do."""
    global _HANDLER_INSTALLED
    if _HANDLER_INSTALLED or not hasattr(os, "register_at_fork"):
        return
    os.register_at_fork(after_in_child=_after_fork_in_child)
    _HANDLER_INSTALLED = True


def _started_as_cli() -> bool:
    """True while ``arq-gym`` or ``python -m arq_gym`` imports the package (``sys.argv[0]`` is
    ``"-m"`` only while Python locates the module that ``-m`` names)."""
    argv0 = sys.argv[0] if sys.argv else ""
    return os.path.basename(argv0) in ("arq-gym", "arq-gym.exe", "-m")


def _apply_at_import() -> None:
    """``import arq_gym``: install the fork handler and honour ``ARQ_GYM_THREADS``.

    A bad value is reported by a warning pointing at the import (an import must not fail on
    it); under the command line it is left to :func:`arq_gym.cli.main`, which reports it as a
    one-line error."""
    install_fork_handler()
    try:
        use_configured_threads()
    except ThreadsError as exc:
        if not _started_as_cli():
            warnings.warn(f"{exc}; ignored", RuntimeWarning, stacklevel=4)
