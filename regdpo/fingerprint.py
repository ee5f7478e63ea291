"""Cheap, stable fingerprints of things on disk (no torch import: the runner uses these)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def dir_fingerprint(root: Path) -> str:
    """Hash of a model directory: JSON config contents + every other file's name/size/mtime.

    Cheap (weights are not read) yet changes whenever a weight file is replaced.
    """
    h = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file())
    for f in files:
        rel = f.relative_to(root).as_posix()
        if any(part.startswith(".") for part in rel.split("/")):  # caches, .gitattributes
            continue
        if f.suffix == ".json":
            h.update(f"{rel}\0".encode() + f.read_bytes())
        else:
            st = f.stat()
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16]
