"""Atomic file writes: the one helper the core and the built-in plugins share.

A file written with these functions is either absent, or its previous version, or complete:
the data goes to a temporary file in the same directory, is flushed and synced, and is then
renamed over the target in one ``os.replace``. A crash can leave a ``.<name>.*.tmp`` file
beside the target, never a half-written target. ``fsync_dir`` makes the rename itself durable.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator


@contextlib.contextmanager
def atomic_writer(path: str | Path, mode: str = "wb", encoding: str | None = None
                  ) -> Iterator[IO[Any]]:
    """Open a temporary file to write ``path``; it replaces ``path`` when the block ends
    without an exception (and is removed when it raises)."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_writer writes whole files: mode 'w' or 'wb', not {mode!r}")
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, encoding=encoding if "b" not in mode else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; artifacts are for sharing
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_writer(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, **dump_kwargs: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (``dump_kwargs`` go to ``json.dumps``,
    for example ``indent=2, sort_keys=True, default=str``)."""
    atomic_write_text(path, json.dumps(obj, **dump_kwargs) + "\n")


def fsync_dir(path: str | Path) -> None:
    """Make the entries of directory ``path`` (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
