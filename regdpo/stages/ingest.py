"""Ingest stage: a manifest of videos + captions -> normalised clips, a clip table and a reject list.

Publishes `<workdir>/ingest/` (see docs/DESIGN.md):

    clips/<clip_id>.mp4   each clip at the training spec (cfg.video: fps, frames, size), upright
    clips.parquet         one row per clip: CLIP_COLUMNS
    rejects.parquet       one row per rejected input: row (manifest row number), path, reason
    units.parquet         the published units (units.py)

One unit per manifest row, keyed by the source file's content hash, the row's window and
caption, the clip spec and the ingest settings that shape clips: a nightly manifest that gained
rows decodes only the new ones, and a replaced source file (new content) is redone.
Problems with the manifest itself stop the run with an error naming the file, row and field
(regdpo/data/manifest.py); problems with one video become reject rows and the run goes on.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from regdpo.config import Config, fingerprint_payload
from regdpo.data.manifest import ManifestError, ManifestRow, read_manifest
from regdpo.data.video import VideoError, VideoReader, write_mp4
from regdpo.durable import atomic_write_json
from regdpo.hashing import derive_seed, short_hash
from regdpo.stages.journal import Transaction
from regdpo.stages.units import StagePlan, Unit, UnitStage, UnitWorker, content_key, stage_folder

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
REJECT_SCHEMA = pa.schema([("row", pa.int64()), ("path", pa.string()), ("reason", pa.string())])
_TOLERANCE_S = 0.05  # header durations are often a few ms off

__all__ = ["CLIP_COLUMNS", "ManifestError", "NoClipsError", "UNITS", "assign_splits", "make_clip_id", "read_manifest",
           "resolve_source"]


class NoClipsError(ValueError):
    """Every input was rejected; the message lists the reasons."""


def resolve_source(manifest: Path, raw: str, *, allow_symlinks_outside: bool = False) -> Path:
    """The file a manifest path names; paths are relative to the manifest's folder and must stay inside it.

    `../x` or an absolute path elsewhere is refused (the reason names the two ways out), and so
    is a symlink (anywhere on the way) that resolves outside the folder, unless
    `allow_symlinks_outside`: a folder other people fill must not pull in any readable file on
    the machine.
    """
    root = os.path.abspath(manifest if manifest.is_dir() else manifest.parent)
    full = os.path.abspath(os.path.join(root, raw))  # an absolute `raw` replaces root here
    if os.path.commonpath([root, full]) != root:
        raise VideoError(raw, f"path outside the manifest folder {root}: manifest paths are relative to it and may not "
                              "leave it (a shared manifest must not read any file on the machine); put the manifest "
                              "in a folder above the videos, or link the video into the folder and set "
                              "ingest.allow_symlinks_outside: true")
    real_root, real = os.path.realpath(root), os.path.realpath(full)
    if not allow_symlinks_outside and os.path.commonpath([real_root, real]) != real_root:
        raise VideoError(raw, "a symlink that points outside the manifest folder (set "
                              "ingest.allow_symlinks_outside: true if that is intended)")
    return Path(full)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class HashCache:
    """sha256 of source files, remembered by (size, mtime, inode) so a nightly plan re-reads
    only new or changed files. `<workdir>/.cache/sha256.json`."""

    def __init__(self, workdir: Path):
        self.path = Path(workdir) / ".cache" / "sha256.json"
        try:
            self.entries: dict[str, list] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}
        self.dirty = False

    def sha256(self, path: Path, st: os.stat_result) -> str:
        sig = [st.st_size, st.st_mtime_ns, st.st_ino]
        real = os.path.realpath(path)
        hit = self.entries.get(real)
        if hit is not None and hit[:3] == sig:
            return hit[3]
        digest = file_sha256(path)
        self.entries[real] = [*sig, digest]
        self.dirty = True
        return digest

    def save(self) -> None:
        if self.dirty:
            atomic_write_json(self.path, self.entries, durable=False)


def make_clip_id(
    sha256: str, start_s: float, end_s: float, fps: float, num_frames: int, height: int, width: int
) -> str:
    """A short hash of the source content hash, the window and the clip spec: stable, no dots."""
    return short_hash([sha256, round(start_s, 6), round(end_s, 6), float(fps), num_frames, height, width])


def _split_score(clip_id: str) -> float:
    """A clip's place in [0, 1) for the held-out split: its own, whatever other clips there are."""
    return derive_seed("split", clip_id, bits=48) / float(1 << 48)


def assign_splits(clip_ids: list[str], heldout_fraction: float, min_heldout: int,
                  fixed: dict[str, str] | None = None) -> list[str]:
    """'train' or 'heldout' per clip, from a hash of its clip_id.

    A clip in `fixed` (the published table) keeps its split, so a nightly run never moves a clip
    between splits. A new clip is held out when its hash score is below `heldout_fraction`; then
    the lowest-scoring new train clips move to heldout until `min_heldout` is reached, and at
    least one clip always stays in train (when there are >= 2 clips).
    """
    fixed = fixed or {}
    splits = {c: fixed[c] for c in clip_ids if c in fixed}
    new = [c for c in clip_ids if c not in splits]
    scores = {c: _split_score(c) for c in new}
    for c in new:
        splits[c] = "heldout" if scores[c] < heldout_fraction else "train"
    wanted = min(min_heldout, len(clip_ids) - 1) if len(clip_ids) >= 2 else 0
    for c in sorted(new, key=scores.__getitem__):
        if sum(s == "heldout" for s in splits.values()) >= wanted:
            break
        splits[c] = "heldout"
    if new and all(s == "heldout" for s in splits.values()):
        splits[max(new, key=scores.__getitem__)] = "train"
    return [splits[c] for c in clip_ids]


class IngestWorker(UnitWorker):
    def __init__(self, cfg: Config):
        self.cfg = cfg
        v = cfg.video
        self.clip_s = v.num_frames / v.fps

    def process(self, unit: Unit, out: Path) -> dict[str, Any]:
        s = unit.spec
        clips: list[dict[str, Any]] = []
        rejects: list[dict[str, str]] = []
        files: dict[str, str] = {}
        try:
            self._video(s, out, clips, rejects, files)
        except VideoError as err:
            clips, files, rejects = [], {}, [{"path": s["path"], "reason": err.reason}]
        except OSError as err:
            clips, files, rejects = [], {}, [{"path": s["path"], "reason": f"unreadable: {err.strerror or err}"}]
        return {"clips": clips, "rejects": rejects, "files": files}

    def _video(self, s: dict[str, Any], out: Path, clips: list, rejects: list, files: dict) -> None:
        with VideoReader(Path(s["src"])) as reader:  # one open for the probe and every clip
            self._clips(s, reader, out, clips, rejects, files)

    def _clips(self, s: dict[str, Any], reader: VideoReader, out: Path, clips: list, rejects: list, files: dict) -> None:
        cfg, v = self.cfg, self.cfg.video
        info = reader.info  # "file not found", "empty file", "no video stream", "undecodable: ..."
        if info.is_still_image:
            raise VideoError(s["path"], f"a still image ({info.codec}), not a video")
        if info.codec == "gif" and not cfg.ingest.allow_gif:
            raise VideoError(s["path"], "GIF input disabled (set ingest.allow_gif: true to use it)")
        duration = info.duration_s if info.duration_s is not None else reader.decodable_duration()
        start = s["start_s"] or 0.0
        # a reject, not a silent clamp: a window past the end usually means the wrong file or times
        if s["end_s"] is not None and s["end_s"] > duration + _TOLERANCE_S:
            raise VideoError(s["path"], f"end_s {s['end_s']:g} is past the end of the video ({duration:.2f} s)")
        end = min(s["end_s"] if s["end_s"] is not None else duration, duration)
        count = min(cfg.ingest.max_clips_per_video, int((end - start + _TOLERANCE_S) // self.clip_s))
        if count < 1:
            raise VideoError(s["path"], f"too short (needs {self.clip_s:.2f} s, has {max(0.0, end - start):.2f} s)")
        if min(info.width, info.height) < cfg.ingest.min_side:
            size, limit = f"{info.width}x{info.height}", cfg.ingest.min_side
            raise VideoError(s["path"], f"resolution below minimum ({size}; ingest.min_side is {limit})")
        spec = {"fps": v.fps, "num_frames": v.num_frames, "height": v.height, "width": v.width}
        for k in range(count):
            clip_start = start + k * self.clip_s
            try:
                frames = reader.read_clip(start_s=clip_start, **spec)
            except VideoError as err:
                if k == 0:
                    raise
                rejects.append({"path": s["path"], "reason": f"clip {k + 1} at {clip_start:.2f} s: {err.reason}"})
                continue
            clip_id = make_clip_id(s["sha256"], clip_start, clip_start + self.clip_s, v.fps, v.num_frames,
                                   v.height, v.width)
            write_mp4(out / f"{clip_id}.mp4", frames, v.fps)
            files[f"clips/{clip_id}.mp4"] = f"{clip_id}.mp4"
            clips.append({
                "clip_id": clip_id, "source": s["path"], "sha256": s["sha256"], "start_s": clip_start,
                "end_s": clip_start + self.clip_s, "fps": float(v.fps), "num_frames": v.num_frames,
                "height": v.height, "width": v.width, "rotation": info.rotation, "caption": s["caption"],
            })


def _table_bytes(rows: list[dict[str, Any]], schema: pa.Schema) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf)
    return buf.getvalue()


class IngestUnits(UnitStage):
    name = "ingest"

    def work_item_size(self, cfg: Config) -> int:
        return cfg.ingest.work_item_size

    def devices(self, cfg: Config) -> list[str | None]:
        return [None] * cfg.ingest.num_workers

    def open_worker(self, cfg: Config, workdir: Path, device: str | None) -> UnitWorker:
        return IngestWorker(cfg)

    def plan_units(self, cfg: Config, workdir: Path) -> tuple[list[Unit], dict[str, Any]]:
        manifest = Path(cfg.ingest.manifest)
        rows = read_manifest(manifest)
        shaping = {"video": fingerprint_payload(cfg.video), "min_side": cfg.ingest.min_side,
                   "max_clips_per_video": cfg.ingest.max_clips_per_video, "allow_gif": cfg.ingest.allow_gif}
        hashes = HashCache(workdir)
        units, rejects = [], []
        for row in rows:
            try:
                src, sha = self._source(manifest, row, hashes, cfg.ingest.allow_symlinks_outside)
            except VideoError as err:
                rejects.append({"row": row.number, "path": row.path, "reason": err.reason})
                continue
            window = [row.start_s, row.end_s]
            unit_id = row.path + ("" if window == [None, None] else f"@{row.start_s}-{row.end_s}")
            key = content_key("ingest", sha, window, row.caption, shaping)
            spec = {"row": row.number, "path": row.path, "src": str(src), "sha256": sha, "caption": row.caption,
                    "start_s": row.start_s, "end_s": row.end_s}
            units.append(Unit(unit_id, key, spec))
        hashes.save()
        return units, {"rejects": rejects}

    @staticmethod
    def _source(manifest: Path, row: ManifestRow, hashes: HashCache, allow_outside: bool) -> tuple[Path, str]:
        if row.problem:
            raise VideoError(row.path, row.problem)
        src = resolve_source(manifest, row.path, allow_symlinks_outside=allow_outside)
        try:
            st = src.stat()
        except FileNotFoundError:
            raise VideoError(row.path, "file not found") from None
        except OSError as err:
            raise VideoError(row.path, f"unreadable: {err.strerror or err}") from None
        if stat.S_ISDIR(st.st_mode):
            raise VideoError(row.path, "a directory, not a video file")
        if not stat.S_ISREG(st.st_mode):
            raise VideoError(row.path, "not a regular file (a device, pipe or socket), not a video file")
        if st.st_size == 0:
            raise VideoError(row.path, "empty file")
        try:
            return src, hashes.sha256(src, st)
        except OSError as err:
            raise VideoError(row.path, f"unreadable: {err.strerror or err}") from None

    def assemble(self, cfg: Config, workdir: Path, plan: StagePlan, results: dict[str, dict[str, Any]],
                 new_keys: set[str], old: dict[str, dict[str, Any]], txn: Transaction) -> tuple[set[str], dict[str, Any]]:
        from regdpo.stages.units import Staging

        folder = stage_folder(workdir, self.name)
        staging = Staging(workdir, self.name)
        rejects = list(plan.extra.get("rejects", []))
        clips: list[dict[str, Any]] = []
        owner: dict[str, int] = {}  # clip_id -> manifest row that produced it
        first_row: dict[str, int] = {}  # unit key -> its first manifest row
        kept: set[str] = set()
        for unit in plan.units:
            row = unit.spec["row"]
            if unit.key in first_row:
                rejects.append({"row": row, "path": unit.spec["path"],
                                "reason": f"duplicate of row {first_row[unit.key]} (same file, window and caption)"})
                continue
            first_row[unit.key] = row
            result = results.get(unit.key)
            if result is None:
                continue  # failed: retried by the next run, listed in stage.json
            whole = True
            for clip in result["clips"]:
                cid = clip["clip_id"]
                if cid in owner:
                    rejects.append({"row": row, "path": unit.spec["path"],
                                    "reason": f"duplicate of row {owner[cid]} (same file content and window)"})
                    whole = False
                    continue
                owner[cid] = row
                clips.append({**clip, "source": unit.spec["path"]})
                if unit.key in new_keys:
                    txn.move(staging.unit_dir(unit.key) / result["files"][f"clips/{cid}.mp4"], folder / "clips" / f"{cid}.mp4")
            rejects.extend({"row": row, **r} for r in result["rejects"])
            if whole:
                kept.add(unit.key)
        rejects.sort(key=lambda r: r["row"])
        if not clips:
            reasons = "\n".join(f"  row {r['row']} {r['path']}: {r['reason']}" for r in rejects)
            raise NoClipsError(f"{cfg.ingest.manifest}: no clip was accepted; fix or replace these inputs:\n{reasons}")

        published = _published_clips(folder)
        fixed = {c: s for c, s in published.items() if c in owner}
        splits = assign_splits([c["clip_id"] for c in clips], cfg.ingest.heldout_fraction, cfg.ingest.min_heldout,
                               fixed)
        for clip, split in zip(clips, splits):
            clip["split"] = split
        for cid in set(published) - set(owner):
            txn.delete(folder / "clips" / f"{cid}.mp4")
        txn.write_bytes(folder / "clips.parquet", _table_bytes(clips, CLIP_SCHEMA))
        txn.write_bytes(folder / "rejects.parquet", _table_bytes(rejects, REJECT_SCHEMA))
        num_heldout = splits.count("heldout")
        return kept, {"num_clips": len(clips), "num_rejects": len(rejects), "num_train": len(clips) - num_heldout,
                      "num_heldout": num_heldout}


def _published_clips(folder: Path) -> dict[str, str]:
    path = folder / "clips.parquet"
    if not path.is_file():
        return {}
    table = pq.read_table(path, columns=["clip_id", "split"]).to_pydict()
    return dict(zip(table["clip_id"], table["split"]))


UNITS = IngestUnits()
