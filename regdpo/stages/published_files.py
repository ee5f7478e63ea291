"""What a unit stage published, as files: `<stage dir>/files.json` keeps each published file's
size and mtime, so a file edited, replaced or deleted afterwards redoes the units it came from."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from regdpo.durable import atomic_write_json

log = logging.getLogger(__name__)

FILES_NAME = "files.json"


def _stat(path: Path) -> list[int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def record_files(folder: Path, files: list[str]) -> None:
    """Remember the size and mtime of `files` (relative to the stage folder) as published."""
    atomic_write_json(folder / FILES_NAME, {rel: _stat(folder / rel) for rel in files}, durable=False)


def changed_units(folder: Path, stage: str, published: dict[str, list[str]]) -> set[str]:
    """Keys of published units (key -> its files) whose files are gone or no longer as published."""
    try:
        recorded = json.loads((folder / FILES_NAME).read_text())
    except (OSError, ValueError):
        recorded = {}
    changed, current = set(), {}
    for key, files in published.items():
        for rel in files:
            if rel not in current:
                current[rel] = _stat(folder / rel)
            if current[rel] is None or (rel in recorded and recorded[rel] != current[rel]):
                changed.add(key)
    for rel in sorted({rel for key in changed for rel in published[key]}):
        log.warning("%s: %s is missing or changed since it was published; its units are redone", stage, folder / rel)
    return changed
