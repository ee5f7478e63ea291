"""Ingest stage: a manifest of videos + captions -> normalised clips, a clip table and a reject list.

Writes into the stage's output folder (published as `<workdir>/ingest/`, see docs/DESIGN.md):

    clips/<clip_id>.mp4   each clip at the training spec (cfg.video: fps, frames, size), upright
    clips.parquet         one row per clip: CLIP_COLUMNS
    rejects.parquet       one row per rejected input: path, reason (plain words); always written

Manifest problems (missing column, empty caption, unreadable number) stop the run with an error
naming the file, row and field: they are the user's to fix. Problems with one video (broken,
too short, too small, outside the manifest folder) become reject rows and the run goes on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from regdpo.config import Config
from regdpo.stages.runner import StageContext
from regdpo.data.video import VideoError, count_decodable_duration, probe, read_clip, write_mp4

log = logging.getLogger(__name__)

CLIP_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()), ("source", pa.string()), ("sha256", pa.string()),
        ("start_s", pa.float64()), ("end_s", pa.float64()), ("fps", pa.float64()),
        ("num_frames", pa.int64()), ("height", pa.int64()), ("width", pa.int64()),
        ("rotation", pa.int64()), ("caption", pa.string()), ("split", pa.string()),
    ]
)
CLIP_COLUMNS = tuple(CLIP_SCHEMA.names)
REJECT_SCHEMA = pa.schema([("path", pa.string()), ("reason", pa.string())])
MANIFEST_COLUMNS = ("path", "caption", "start_s", "end_s")
_TOLERANCE_S = 0.05  # header durations are often a few ms off


class ManifestError(ValueError):
    """The manifest itself is wrong; the message names the file, the row and the field."""


class NoClipsError(ValueError):
    """Every input was rejected; the message lists the reasons."""


@dataclass(frozen=True)
class ManifestRow:
    number: int  # 1-based data row
    path: str  # as written in the manifest
    caption: str
    start_s: float | None
    end_s: float | None


def read_manifest(path: str | os.PathLike) -> list[ManifestRow]:
    """Parse and check a CSV or parquet manifest (columns path, caption, optional start_s, end_s)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found; set ingest.manifest to a CSV or parquet file")
    if path.suffix.lower() == ".csv":
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    elif path.suffix.lower() in (".parquet", ".pq"):
        df = pd.read_parquet(path)
    else:
        raise ManifestError(f"{path}: unsupported manifest type {path.suffix!r}; use .csv or .parquet")
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
    return [_parse_row(path, i + 1, rec) for i, rec in enumerate(df.to_dict("records"))]


def _parse_row(manifest: Path, number: int, rec: dict[str, Any]) -> ManifestRow:
    where = f"{manifest}: row {number}" + (f" (line {number + 1})" if manifest.suffix.lower() == ".csv" else "")
    path, caption = (_text(where, f, rec.get(f)) for f in ("path", "caption"))
    start, end = (_seconds(where, f, rec.get(f)) for f in ("start_s", "end_s"))
    if start is not None and end is not None and end <= start:
        raise ManifestError(f"{where}, field 'end_s': end_s ({end:g}) must be after start_s ({start:g})")
    return ManifestRow(number, path, caption, start, end)


def _text(where: str, field: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or not str(value).strip():
        raise ManifestError(f"{where}, field '{field}': empty or missing; every row needs a {field}")
    if not isinstance(value, str):
        raise ManifestError(f"{where}, field '{field}': {value!r} is not text")
    return value.strip()


def _seconds(where: str, field: str, value: Any) -> float | None:
    """An optional time in seconds; empty/NaN means "not given"."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ManifestError(
            f"{where}, field '{field}': {value!r} is not a number of seconds; use e.g. 2.5 or leave it empty"
        ) from None
    if math.isnan(seconds):
        return None
    if not math.isfinite(seconds) or seconds < 0:
        raise ManifestError(f"{where}, field '{field}': {value!r} must be a finite number of seconds >= 0")
    return seconds


def resolve_source(manifest: Path, raw: str) -> Path:
    """The file a manifest path names; paths are relative to the manifest's folder and must stay inside it.

    The check is lexical (after normalising `..`), so a symlink placed inside the folder on purpose
    is followed, but `../x` or an absolute path elsewhere is refused.
    """
    root = os.path.abspath(manifest.parent)
    full = os.path.abspath(os.path.join(root, raw))  # an absolute `raw` replaces root here
    if os.path.commonpath([root, full]) != root:
        raise VideoError(raw, "path outside the manifest folder")
    return Path(full)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def make_clip_id(
    sha256: str, start_s: float, end_s: float, fps: float, num_frames: int, height: int, width: int
) -> str:
    """First 16 hex of sha256 over the source content hash, the window and the clip spec: stable, no dots."""
    key = json.dumps([sha256, round(start_s, 6), round(end_s, 6), float(fps), num_frames, height, width])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _split_score(clip_id: str) -> float:
    return int(hashlib.sha256(f"split:{clip_id}".encode()).hexdigest()[:12], 16) / float(1 << 48)


def assign_splits(clip_ids: list[str], heldout_fraction: float, min_heldout: int) -> list[str]:
    """'train' or 'heldout' per clip, from a hash of its clip_id (so a clip keeps its split).

    A clip is held out when its hash score is below `heldout_fraction`. With >= 2 clips, the
    lowest-scoring train clips are moved to heldout until `min_heldout` is reached, and at least
    one clip always stays in train.
    """
    scores = [_split_score(c) for c in clip_ids]
    heldout = {i for i, s in enumerate(scores) if s < heldout_fraction}
    order = sorted(range(len(clip_ids)), key=lambda i: scores[i])
    if len(clip_ids) >= 2:
        for i in order:
            if len(heldout) >= min(min_heldout, len(clip_ids) - 1):
                break
            heldout.add(i)
    if heldout and len(heldout) == len(clip_ids):
        heldout.discard(order[-1])
    return ["heldout" if i in heldout else "train" for i in range(len(clip_ids))]


class _Ingester:
    """Turns manifest rows into clips, collecting clip rows and reject rows."""

    def __init__(self, cfg: Config, manifest: Path, out: Path):
        self.cfg, self.manifest, self.out = cfg, manifest, out
        v = cfg.video
        self.clip_s = v.num_frames / v.fps
        self.clips: list[dict[str, Any]] = []
        self.rejects: list[dict[str, str]] = []
        self._hashes: dict[Path, str] = {}
        self._seen: dict[str, int] = {}  # clip_id -> manifest row that produced it

    def reject(self, path: str, reason: str) -> None:
        self.rejects.append({"path": path, "reason": reason})

    def row(self, row: ManifestRow) -> None:
        """Ingest one manifest row; raises VideoError for a problem with the whole video."""
        src = resolve_source(self.manifest, row.path)
        info = probe(src)  # "file not found", "empty file", "no video stream", "undecodable: ..."
        if info.codec == "gif" and not self.cfg.ingest.allow_gif:
            raise VideoError(row.path, "GIF input disabled (set ingest.allow_gif: true to use it)")
        duration = info.duration_s if info.duration_s is not None else count_decodable_duration(src)
        start = row.start_s or 0.0
        # a reject, not a silent clamp: a window past the end usually means the wrong file or times
        if row.end_s is not None and row.end_s > duration + _TOLERANCE_S:
            raise VideoError(row.path, f"end_s {row.end_s:g} is past the end of the video ({duration:.2f} s)")
        end = min(row.end_s if row.end_s is not None else duration, duration)
        count = min(self.cfg.ingest.max_clips_per_video, int((end - start + _TOLERANCE_S) // self.clip_s))
        if count < 1:
            raise VideoError(row.path, f"too short (needs {self.clip_s:.2f} s, has {max(0.0, end - start):.2f} s)")
        if min(info.width, info.height) < self.cfg.ingest.min_side:
            size, limit = f"{info.width}x{info.height}", self.cfg.ingest.min_side
            raise VideoError(row.path, f"resolution below minimum ({size}; ingest.min_side is {limit})")
        if src not in self._hashes:
            self._hashes[src] = file_sha256(src)
        for k in range(count):
            try:
                self._clip(row, src, info.rotation, start + k * self.clip_s)
            except VideoError as err:
                if k == 0:
                    raise
                self.reject(row.path, f"clip {k + 1} at {start + k * self.clip_s:.2f} s: {err.reason}")

    def _clip(self, row: ManifestRow, src: Path, rotation: int, clip_start: float) -> None:
        v = self.cfg.video
        clip_end = clip_start + self.clip_s
        sha = self._hashes[src]
        clip_id = make_clip_id(sha, clip_start, clip_end, v.fps, v.num_frames, v.height, v.width)
        if clip_id in self._seen:
            raise VideoError(row.path, f"duplicate of row {self._seen[clip_id]} (same file content and window)")
        spec = {"fps": v.fps, "num_frames": v.num_frames, "height": v.height, "width": v.width}
        frames = read_clip(src, start_s=clip_start, **spec)
        write_mp4(self.out / "clips" / f"{clip_id}.mp4", frames, v.fps)
        self._seen[clip_id] = row.number
        self.clips.append(
            {
                "clip_id": clip_id, "source": row.path, "sha256": sha, "start_s": clip_start, "end_s": clip_end,
                "fps": float(v.fps), "num_frames": v.num_frames, "height": v.height, "width": v.width,
                "rotation": rotation, "caption": row.caption, "split": "",
            }
        )


def build(ctx: StageContext) -> dict[str, int]:
    """Ingest stage entry point (see regdpo.stages.runner): writes clips/, clips.parquet, rejects.parquet into `ctx.out`.

    Returns counts: num_clips, num_rejects, num_train, num_heldout.
    """
    cfg, out = ctx.cfg, ctx.out
    manifest = Path(cfg.ingest.manifest)
    rows = read_manifest(manifest)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    ing = _Ingester(cfg, manifest, out)
    for row in tqdm(rows, desc="ingest", unit="video"):
        try:
            ing.row(row)
        except VideoError as err:
            ing.reject(row.path, err.reason)
        except OSError as err:
            ing.reject(row.path, f"unreadable: {err.strerror or err}")
        except Exception as err:  # one odd file must not stop the run; the reason says what happened
            log.exception("ingest: unexpected error on %s (manifest row %d)", row.path, row.number)
            ing.reject(row.path, f"unexpected error: {type(err).__name__}: {err}")

    pq.write_table(pa.Table.from_pylist(ing.rejects, schema=REJECT_SCHEMA), out / "rejects.parquet")
    if not ing.clips:
        reasons = "\n".join(f"  {r['path']}: {r['reason']}" for r in ing.rejects)
        raise NoClipsError(f"{manifest}: no clip was accepted; fix or replace these inputs:\n{reasons}")
    splits = assign_splits([c["clip_id"] for c in ing.clips], cfg.ingest.heldout_fraction, cfg.ingest.min_heldout)
    for clip, split in zip(ing.clips, splits):
        clip["split"] = split
    pq.write_table(pa.Table.from_pylist(ing.clips, schema=CLIP_SCHEMA), out / "clips.parquet")
    num_heldout = splits.count("heldout")
    return {
        "num_clips": len(ing.clips),
        "num_rejects": len(ing.rejects),
        "num_train": len(ing.clips) - num_heldout,
        "num_heldout": num_heldout,
    }
