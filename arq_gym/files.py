"""Small file helpers shared by the package: atomic writes and JSON with numpy values."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "dumps",
    "file_mode",
    "json_default",
    "portable_path",
]


def file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file: ``0o666`` less the process umask.

    The umask is read from ``/proc/self/status`` where there is one (``os.umask`` has no
    read-only call, and setting it briefly would race with threads creating files)."""
    mask = None
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                mask = int(line.split()[1], 8)
                break
    if mask is None:
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and
    ``os.replace``: readers see the old file or the new one, never half of one. The parent
    folder is created if needed. The file gets the mode a plain ``open(path, "w")`` would
    (``0o666`` less the umask), not ``mkstemp``'s 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file 0600; give it the mode a plain open() would (umask honoured)
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Text (UTF-8) version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode())


def json_default(o: Any) -> Any:
    """``json.dumps`` fallback: numpy scalars and arrays become Python values, paths strings."""
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def dumps(obj: Any) -> str:
    """Indented JSON with a final newline (numpy values and paths allowed)."""
    return json.dumps(obj, indent=2, default=json_default) + "\n"


def portable_path(path: str | os.PathLike) -> str:
    """``path`` as recorded in result files: inside the installed package as
    ``arq_gym/...``, inside the user cache directory as ``<cache>/...``, otherwise as given, so
    that results name no folder of the machine that produced them."""
    from arq_gym.data import user_cache_dir

    p = Path(path)
    for root, label in ((Path(__file__).resolve().parent, "arq_gym"), (user_cache_dir(), "<cache>")):
        try:
            return f"{label}/{p.resolve().relative_to(root.resolve()).as_posix()}"
        except ValueError:
            continue
    return str(path)
