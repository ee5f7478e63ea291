"""Manifests: which videos to ingest, with their captions.

`ingest.manifest` is one of
- a CSV, parquet or JSONL file with columns `path, caption[, start_s, end_s]`, paths relative
  to the manifest's folder;
- a folder of videos, each with its caption in a same-named .txt beside it
  (`clip.mp4` + `clip.txt`, the convention of musubi-tuner and finetrainers), searched recursively.

Problems with the manifest itself (a missing or unknown column, no rows, a CSV that is not
UTF-8 or whose rows do not match its header) raise `ManifestError` naming the file (and the
row): nothing in it can be trusted. A problem with one row's values (an empty caption or path,
a time that is not a number, an end before the start) or a video without its .txt in a folder
is a row-level problem: the row comes back as a `ManifestRow` with `problem` set, which ingest
records as a reject, and the other rows go on (one bad row must not block a nightly run).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

MANIFEST_COLUMNS = ("path", "caption", "start_s", "end_s")
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".gif", ".mpg", ".mpeg", ".ts")


class ManifestError(ValueError):
    """The manifest itself is wrong; the message names the file, the row and the field."""


@dataclass(frozen=True)
class ManifestRow:
    number: int  # 1-based data row (for a folder: position in sorted order)
    path: str  # as written in the manifest (relative to its folder)
    caption: str
    start_s: float | None
    end_s: float | None
    problem: str | None = None  # a row-level problem ingest records as a reject


def read_manifest(path: str | os.PathLike) -> list[ManifestRow]:
    """Parse and check a manifest file or folder (see module docstring)."""
    path = Path(path)
    if path.is_dir():
        return _read_folder(path)
    if not path.exists():
        raise ManifestError(f"{path}: manifest not found; set ingest.manifest to a CSV, parquet or JSONL file, "
                            "or a folder of videos with same-named .txt captions")
    if not path.is_file():
        raise ManifestError(f"{path}: not a regular file; set ingest.manifest to a manifest file or a folder")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        df = _read_csv(path)
    elif suffix in (".parquet", ".pq"):
        try:
            df = pd.read_parquet(path)
        except Exception as err:  # pyarrow raises several types for a file that is not parquet
            raise ManifestError(f"{path}: not a readable parquet file ({err})") from None
    elif suffix in (".jsonl", ".ndjson"):
        df = _read_jsonl(path)
    else:
        raise ManifestError(f"{path}: unsupported manifest type {path.suffix!r}; use .csv, .parquet, .jsonl or a folder")
    df.columns = [str(c).strip() for c in df.columns]
    for col in ("path", "caption"):
        if col not in df.columns:
            raise ManifestError(f"{path}: missing required column '{col}'; columns are: {', '.join(df.columns)}")
    unknown = [c for c in df.columns if c not in MANIFEST_COLUMNS]
    if unknown:
        raise ManifestError(
            f"{path}: unknown column(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(MANIFEST_COLUMNS)}"
        )
    if df.empty:
        raise ManifestError(f"{path}: the manifest has no rows; add one row per video")
    return [_parse_row(i + 1, rec) for i, rec in enumerate(df.to_dict("records"))]


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ManifestError(f"{path}: not UTF-8 text (byte {err.start}); save the CSV as UTF-8") from None
    if not text.strip():
        raise ManifestError(f"{path}: the file is empty; it needs a header line 'path,caption' and one row per video")
    # Every row must have exactly the header's fields: pandas would otherwise turn an extra
    # leading field into an index and shift every column silently.
    try:
        rows = [row for row in csv.reader(io.StringIO(text), strict=True) if row]
    except csv.Error as err:
        raise ManifestError(f"{path}: not a valid CSV ({err}); check the quotes around captions") from None
    header = rows[0]
    for i, row in enumerate(rows[1:], start=1):
        if len(row) != len(header):
            raise ManifestError(f"{path}: row {i} (line {i + 1}) has {len(row)} fields, the header has "
                                f"{len(header)} ({', '.join(header)}); quote captions that contain commas")
    try:
        return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, index_col=False, skip_blank_lines=True)
    except (pd.errors.ParserError, ValueError) as err:
        raise ManifestError(f"{path}: not a valid CSV ({err})") from None


def _read_jsonl(path: Path) -> pd.DataFrame:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ManifestError(f"{path}: not UTF-8 text (byte {err.start}); save the JSONL as UTF-8") from None
    records = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise ManifestError(f"{path}: line {i} is not JSON ({err.msg})") from None
        if not isinstance(rec, dict):
            raise ManifestError(f"{path}: line {i} must be a JSON object with path and caption")
        records.append(rec)
    return pd.DataFrame.from_records(records)


def _read_folder(folder: Path) -> list[ManifestRow]:
    videos = sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and not p.name.startswith("."))
    if not videos:
        raise ManifestError(f"{folder}: no videos found (looked for {', '.join(VIDEO_SUFFIXES)}); "
                            "put videos with same-named .txt captions there, or point ingest.manifest at a manifest file")
    rows = []
    for number, video in enumerate(videos, start=1):
        rel = video.relative_to(folder).as_posix()
        txt = video.with_suffix(".txt")
        problem, caption = None, ""
        if not txt.is_file():
            problem = f"no caption: add {txt.name} beside it"
        else:
            try:
                caption = txt.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError:
                problem = f"caption file {txt.name} is not UTF-8 text"
            if not problem and not caption:
                problem = f"caption file {txt.name} is empty"
        rows.append(ManifestRow(number, rel, caption, None, None, problem))
    return rows


def _parse_row(number: int, rec: dict[str, Any]) -> ManifestRow:
    """One row; a bad value makes the row a reject (`problem` says which field and why)."""
    raw_path = rec.get("path")
    path = str(raw_path).strip() if isinstance(raw_path, str) else ""
    try:
        path = _text("path", raw_path)
        caption = _text("caption", rec.get("caption"))
        start, end = (_seconds(f, rec.get(f)) for f in ("start_s", "end_s"))
        if start is not None and end is not None and end <= start:
            raise ManifestError(f"field 'end_s': end_s ({end:g}) must be after start_s ({start:g})")
    except ManifestError as err:
        return ManifestRow(number, path, "", None, None, str(err))
    return ManifestRow(number, path, caption, start, end)


def _text(field: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or not str(value).strip():
        raise ManifestError(f"field '{field}': empty or missing; every row needs a {field}")
    if not isinstance(value, str):
        raise ManifestError(f"field '{field}': {value!r} is not text")
    return value.strip()


def _seconds(field: str, value: Any) -> float | None:
    """An optional time in seconds; empty/NaN means "not given"."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ManifestError(f"field '{field}': {value!r} is not a number of seconds; use e.g. 2.5 or leave it "
                            "empty") from None
    if math.isnan(seconds):
        return None
    if not math.isfinite(seconds) or seconds < 0:
        raise ManifestError(f"field '{field}': {value!r} must be a finite number of seconds >= 0")
    return seconds
