"""Writes that a kill or a power cut cannot tear: temporary name, fsync, one rename.

Readers see the old file or the whole new one. `durable` adds the fsyncs that make the new
file (and the rename) survive a power cut; a cache can do without them. Every temporary name
contains TMP_MARK, so whoever cleans up after a kill finds them (stages/journal.py `recover`).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp-"


def tmp_name(path: Path) -> Path:
    """A unique temporary sibling of `path` (same folder, so a rename is atomic)."""
    return path.with_name(f"{path.name}{TMP_MARK}{uuid.uuid4().hex[:12]}")


def fsync_dir(directory: Path) -> None:
    """Make the renames and new names in `directory` durable (where the filesystem can)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # filesystems that cannot fsync a directory
        pass
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes) -> None:
    """Write `data` to `path` and fsync it (the caller renames it into place)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def sync_to_disk(path: Path) -> None:
    """fsync a file, or every file of a folder and the folders themselves, before a rename
    makes it visible: after a power cut a published name never points at empty or partial files."""
    path = Path(path)
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    for f in files:
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
    for d in {*(f.parent for f in files), path.parent}:
        fsync_dir(d)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> Path:
    """Write `data` to `path` atomically; `durable` also survives a power cut."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        if durable:
            write_synced(tmp, data)
        else:
            tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, durable: bool = True) -> Path:
    return atomic_write_bytes(path, text.encode(), durable=durable)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, durable: bool = True) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode(), durable=durable)
