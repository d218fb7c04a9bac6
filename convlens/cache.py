"""What convlens can rebuild, kept between runs in the user's cache folder.

Every conversion used to start by building the grammar's LALR tables and parsing its rule file
and the shipped scheme files: ~110 ms before the first header is read, more than the planning
of a 9,000-tensor checkpoint. Both results are kept here, each in a file named by a digest of
everything it was made from, so a changed input is never answered with an old result. A file
is written to a temporary name and renamed into place (a concurrent run reads a whole file or
none); one that cannot be read is rebuilt; a cache that cannot be written is skipped. Nothing
here is needed: ``CONVLENS_CACHE_DIR=off`` keeps nothing and only costs the time.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

T = TypeVar("T")

MAX_FILES = 2000  # per kind; the oldest half goes when there are more


def cache_dir() -> Path | None:
    """``$CONVLENS_CACHE_DIR``, else ``$XDG_CACHE_HOME/convlens``, else ``~/.cache/convlens``;
    ``CONVLENS_CACHE_DIR=off`` (or ``0``, ``no``, or empty) keeps nothing."""
    chosen = os.environ.get("CONVLENS_CACHE_DIR")
    if chosen is not None:
        return None if chosen.strip().lower() in ("", "0", "off", "no") else Path(chosen)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "convlens"


def digest(*parts: str | bytes) -> str:
    """A name for what was made from ``parts`` (each part delimited, so no two lists of parts
    run together into one)."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:32]


def _path(kind: str, name: str) -> Path | None:
    root = cache_dir()
    return None if root is None else root / kind / name


def load(kind: str, name: str, read: Callable[[IO[bytes]], T]) -> T | None:
    """What ``read`` makes of the cached file, or None if there is none that reads."""
    path = _path(kind, name)
    if path is None:
        return None
    try:
        with path.open("rb") as f:
            return read(f)
    except Exception:  # not there, damaged or foreign: the caller rebuilds it
        return None


def store(kind: str, name: str, write: Callable[[IO[bytes]], Any]) -> None:
    """Keep what ``write`` writes under ``name``, whole or not at all."""
    path = _path(kind, name)
    if path is None:
        return
    # one temporary name per process and thread: two writers never share a file
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("wb") as f:
            write(f)
        os.replace(tmp, path)
        _prune(path.parent)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _prune(folder: Path) -> None:
    entries = list(os.scandir(folder))
    if len(entries) <= MAX_FILES:
        return
    entries.sort(key=lambda e: e.stat().st_mtime)
    for e in entries[: len(entries) // 2]:
        with contextlib.suppress(OSError):
            os.unlink(e.path)
