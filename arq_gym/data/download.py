"""Download a file with a progress bar and checksum verification (the only network access)."""

from __future__ import annotations

import hashlib
import os
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download(url: str, dest: str | os.PathLike, sha256: str | None, timeout: float = 60.0) -> Path:
    """Fetch ``url`` to ``dest`` atomically; raise ValueError if the sha256 does not match.

    The file is written to ``dest + ".part"`` and renamed only once its checksum is verified, so
    an interrupted or corrupt download never leaves a file that looks complete.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    h = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=timeout) as resp, open(part, "wb") as out:
        total = int(resp.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}") as bar:
            while block := resp.read(1 << 16):
                out.write(block)
                h.update(block)
                bar.update(len(block))
    digest = h.hexdigest()
    if sha256 is not None and digest != sha256:
        part.unlink(missing_ok=True)
        raise ValueError(
            f"checksum mismatch for {url}: got sha256 {digest}, expected {sha256}; "
            "the download is corrupt or the mirror serves another file"
        )
    os.replace(part, dest)
    return dest
