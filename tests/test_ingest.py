"""Ingest stage: manifests, rejects for awkward files, clip table contract, ids, splits, rotation."""

import shutil
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from regdpo.config import config_from_dict
from regdpo.data.video import read_frames
from regdpo.stages.ingest import (
    CLIP_COLUMNS,
    ManifestError,
    NoClipsError,
    assign_splits,
    make_clip_id,
)
from regdpo.stages.runner import run_stage

ROOT = Path(__file__).resolve().parents[1]
BAD = ROOT / "tests" / "assets" / "bad_videos"
SAMPLES = ROOT / "data" / "samples"
SMALL = {"fps": 8, "num_frames": 9, "height": 32, "width": 32}

# README.md in tests/assets/bad_videos: the outcome each awkward file must get (None = accepted).
BAD_EXPECTED = {
    "alpha_vp9.webm": None,
    "animated.gif": None,  # ingest.allow_gif defaults to true
    "no_duration_vp9.webm": None,
    "corrupted_h264.mp4": None,  # the first 1.125 s decode cleanly; the error comes at ~2.8 s
    "empty_zero_bytes.webm": "empty file",
    "one_by_one_pixel.mp4": "resolution below minimum",
    "four_frames_unordered.mov": "too short",
    "rotated_90_three_frames.mov": "too short",
}


def make_cfg(tmp_path: Path, manifest: Path, video: dict | None = None, **ingest):
    return config_from_dict(
        {
            "workdir": str(tmp_path / "work"),
            "model": {"preset": "tiny"},
            "video": video or SMALL,
            "ingest": {"manifest": str(manifest), "min_side": 32, **ingest},
        }
    )


COUNTERS = {"units_done", "units_reused", "units_failed"}


def run_build(cfg, tmp_path: Path, name: str = "out"):
    """Run the ingest stage in workdir tmp_path/name; (summary without unit counters, ingest/ folder)."""
    cfg = cfg.model_copy(update={"workdir": str(tmp_path / name)})
    result = run_stage(cfg, "ingest")
    return {k: v for k, v in result.summary.items() if k not in COUNTERS}, result.path


def write_manifest(folder: Path, rows: list[dict], name: str = "manifest.csv") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def rejects_of(out: Path) -> dict[str, str]:
    table = pd.read_parquet(out / "rejects.parquet")
    return dict(zip(table["path"], table["reason"]))


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    """The sample manifest ingested once at a small spec (shared by several tests)."""
    tmp = tmp_path_factory.mktemp("samples")
    cfg = make_cfg(tmp, SAMPLES / "manifest.csv", video={"fps": 8, "num_frames": 9, "height": 144, "width": 256})
    summary, out = run_build(cfg, tmp)
    return cfg, summary, out, pd.read_parquet(out / "clips.parquet")


def test_every_bad_video_gets_the_readme_outcome(tmp_path):
    folder = tmp_path / "videos"
    shutil.copytree(BAD, folder)
    manifest = write_manifest(folder, [{"path": name, "caption": f"clip {name}"} for name in BAD_EXPECTED])
    summary, out = run_build(make_cfg(tmp_path, manifest), tmp_path)
    clips, rejects = pd.read_parquet(out / "clips.parquet"), rejects_of(out)
    for name, reason in BAD_EXPECTED.items():
        if reason is None:
            assert name in set(clips["source"]), f"{name} should be accepted; rejected with {rejects.get(name)!r}"
        else:
            assert rejects.get(name, "").startswith(reason), f"{name}: expected {reason!r}, got {rejects.get(name)!r}"
    assert summary["num_clips"] == 4 and summary["num_rejects"] == 4
    for clip_id in clips["clip_id"]:
        assert read_frames(out / "clips" / f"{clip_id}.mp4").shape == (9, 32, 32, 3)


def test_gif_can_be_turned_off(tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    for name in ("animated.gif", "alpha_vp9.webm"):
        shutil.copy(BAD / name, folder / name)
    rows = [{"path": "animated.gif", "caption": "a"}, {"path": "alpha_vp9.webm", "caption": "b"}]
    manifest = write_manifest(folder, rows)
    _, out = run_build(make_cfg(tmp_path, manifest, allow_gif=False), tmp_path)
    assert rejects_of(out)["animated.gif"].startswith("GIF input disabled")


def test_paths_may_not_escape_the_manifest_folder(tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    shutil.copy(BAD / "alpha_vp9.webm", folder / "ok.webm")
    shutil.copy(BAD / "alpha_vp9.webm", tmp_path / "outside.webm")
    rows = [
        {"path": "ok.webm", "caption": "inside"},
        {"path": "../outside.webm", "caption": "escapes"},
        {"path": str(tmp_path / "outside.webm"), "caption": "absolute, outside"},
        {"path": "sub/../../outside.webm", "caption": "escapes through a subfolder"},
        {"path": "missing.webm", "caption": "not there"},
    ]
    summary, out = run_build(make_cfg(tmp_path, write_manifest(folder, rows)), tmp_path)
    rejects = rejects_of(out)
    for escaped in rows[1:4]:
        reason = rejects[escaped["path"]]
        assert reason.startswith(f"path outside the manifest folder {folder}: ")
        # the way out: a manifest above the videos, or an explicit opt-in for links
        assert "put the manifest in a folder above the videos" in reason
        assert "ingest.allow_symlinks_outside: true" in reason
    assert rejects["missing.webm"] == "file not found"
    assert summary["num_clips"] == 1


def test_manifest_errors_name_the_file_row_and_field(tmp_path):
    folder = tmp_path / "videos"
    no_caption = write_manifest(folder, [{"path": "a.mp4"}], "no_caption.csv")
    with pytest.raises(ManifestError, match=r"no_caption\.csv: missing required column 'caption'"):
        run_stage(make_cfg(tmp_path, no_caption), "ingest")
    typo = write_manifest(folder, [{"path": "a.mp4", "caption": "ok", "end_sec": 2}], "typo.csv")
    with pytest.raises(ManifestError, match=r"unknown column\(s\) 'end_sec'"):
        run_stage(make_cfg(tmp_path, typo), "ingest")


def test_a_row_with_an_empty_caption_is_rejected_and_the_rest_published(tmp_path):
    """One bad row must not block the run (a nightly ingest of a growing manifest): bad values in a
    row make that row a reject naming the field; the other rows' clips are published."""
    folder = tmp_path / "videos"
    folder.mkdir()
    for name in ("a.webm", "b.webm", "c.webm", "d.webm"):
        shutil.copy(BAD / "alpha_vp9.webm", folder / name)
    rows = [{"path": "a.webm", "caption": "a good row"}, {"path": "b.webm", "caption": " "},
            {"path": "c.webm", "caption": "ok", "start_s": "soon"},
            {"path": "d.webm", "caption": "ok", "start_s": 3, "end_s": 2}, {"path": "", "caption": "no file"}]
    summary, out = run_build(make_cfg(tmp_path, write_manifest(folder, rows)), tmp_path)
    assert summary["num_clips"] == 1 and summary["num_rejects"] == 4
    rejects = pd.read_parquet(out / "rejects.parquet")
    assert rejects["row"].tolist() == [2, 3, 4, 5]
    assert rejects["path"].tolist() == ["b.webm", "c.webm", "d.webm", ""]
    reasons = rejects["reason"].tolist()
    assert reasons[0] == "field 'caption': empty or missing; every row needs a caption"
    assert reasons[1].startswith("field 'start_s': 'soon' is not a number of seconds")
    assert reasons[2] == "field 'end_s': end_s (2) must be after start_s (3)"
    assert reasons[3] == "field 'path': empty or missing; every row needs a path"
    assert pd.read_parquet(out / "clips.parquet")["caption"].tolist() == ["a good row"]


def test_parquet_manifest_and_windows(tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    shutil.copy(BAD / "alpha_vp9.webm", folder / "a.webm")  # 5 s
    rows = pd.DataFrame(
        {
            "path": ["a.webm", "a.webm", "./a.webm"],
            "caption": ["window", "past the end", "same window again"],
            "start_s": [1.0, 0.0, 1.0],
            "end_s": [4.5, 9.0, 3.0],
        }
    )
    rows.to_parquet(folder / "m.parquet")
    summary, out = run_build(make_cfg(tmp_path, folder / "m.parquet", max_clips_per_video=5), tmp_path)
    clips = pd.read_parquet(out / "clips.parquet")
    # 3.5 s window / 1.125 s per clip -> 3 back-to-back clips from the window start
    assert clips["start_s"].tolist() == pytest.approx([1.0, 2.125, 3.25])
    assert clips["end_s"].tolist() == pytest.approx([2.125, 3.25, 4.375])
    rejects = rejects_of(out)
    assert rejects["a.webm"].startswith("end_s 9 is past the end of the video")
    assert rejects["./a.webm"] == "duplicate of row 1 (same file content and window)"  # would clash as a clip_id
    assert summary == {"num_clips": 3, "num_rejects": 2, "num_train": 2, "num_heldout": 1}


def test_nothing_accepted_is_an_error_listing_the_reasons(tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    shutil.copy(BAD / "empty_zero_bytes.webm", folder / "e.webm")
    manifest = write_manifest(folder, [{"path": "e.webm", "caption": "x"}, {"path": "../y.mp4", "caption": "y"}])
    with pytest.raises(NoClipsError, match=r"(?s)no clip was accepted.*e\.webm: empty file.*path outside"):
        run_build(make_cfg(tmp_path, manifest), tmp_path)


def test_clip_table_contract(sample_run):
    cfg, summary, out, clips = sample_run
    assert tuple(pq.read_schema(out / "clips.parquet").names) == CLIP_COLUMNS == (
        "clip_id", "source", "sha256", "start_s", "end_s", "fps", "num_frames",
        "height", "width", "rotation", "caption", "split",
    )
    rejects = pq.read_schema(out / "rejects.parquet")
    assert rejects.names == ["row", "path", "reason"]
    assert [str(t) for t in rejects.types] == ["int64", "string", "string"]
    assert summary["num_clips"] == len(clips) == 10 and summary["num_rejects"] == 0
    assert sorted(p.stem for p in (out / "clips").iterdir()) == sorted(clips["clip_id"])
    assert clips["clip_id"].is_unique and clips["clip_id"].str.fullmatch(r"[0-9a-f]{16}").all()
    assert set(clips["source"]) == set(pd.read_csv(SAMPLES / "manifest.csv")["path"])
    assert (clips["num_frames"] == 9).all() and (clips["height"] == 144).all() and (clips["width"] == 256).all()
    assert clips.loc[clips["source"] == "dog_living_room_rot180.mp4", "rotation"].tolist() == [180]


def test_split_has_train_and_heldout(sample_run):
    _, summary, _, clips = sample_run
    assert set(clips["split"]) == {"train", "heldout"}
    assert summary["num_heldout"] >= 1 and summary["num_train"] >= 1
    assert summary["num_train"] + summary["num_heldout"] == summary["num_clips"]


def test_clip_ids_are_deterministic(sample_run, tmp_path):
    cfg, _, _, clips = sample_run
    _, out2 = run_build(cfg, tmp_path, "again")
    again = pd.read_parquet(out2 / "clips.parquet")
    assert again[["clip_id", "split"]].equals(clips[["clip_id", "split"]])
    a = make_clip_id("ab" * 32, 2.0, 3.125, 8.0, 9, 32, 32)
    assert a == make_clip_id("ab" * 32, 2.0, 3.125, 8, 9, 32, 32) and "." not in a and len(a) == 16
    assert a != make_clip_id("ab" * 32, 2.0, 3.125, 8.0, 9, 32, 48)


def test_rot180_sample_comes_out_upright(sample_run):
    _, _, out, clips = sample_run
    clip_id = clips.loc[clips["source"] == "dog_living_room_rot180.mp4", "clip_id"].item()
    first = read_frames(out / "clips" / f"{clip_id}.mp4")[0].astype(np.float64)
    with av.open(str(SAMPLES / "dog_living_room_rot180.mp4")) as c:  # PyAV leaves the frame as stored
        raw = next(c.decode(video=0)).reformat(width=256, height=144).to_ndarray(format="rgb24").astype(np.float64)
    upright = np.corrcoef(first.ravel(), np.rot90(raw, 2).ravel())[0, 1]
    as_stored = np.corrcoef(first.ravel(), raw.ravel())[0, 1]
    assert upright > 0.9 and upright > as_stored + 0.3, (upright, as_stored)


def test_assign_splits_rules():
    ids = [f"{i:016x}" for i in range(200)]
    splits = assign_splits(ids, 0.1, 1)
    assert 5 <= splits.count("heldout") <= 40 and splits == assign_splits(ids, 0.1, 1)
    assert assign_splits(ids[:1], 0.5, 1) == ["train"]  # one clip: train, never held out
    assert sorted(assign_splits(ids[:2], 0.0, 1)) == ["heldout", "train"]
    assert assign_splits(ids[:3], 0.0, 5).count("train") == 1  # min_heldout capped: one train stays
    assert assign_splits(ids[:3], 0.99, 0).count("train") == 1
    assert assign_splits(ids[:3], 0.0, 0) == ["train"] * 3


def test_runs_under_the_stage_runner(tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    shutil.copy(BAD / "alpha_vp9.webm", folder / "a.webm")
    cfg = make_cfg(tmp_path, write_manifest(folder, [{"path": "a.webm", "caption": "a red ball"}]))
    result = run_stage(cfg, "ingest")
    published = Path(cfg.workdir) / "ingest"
    assert result.path == published and result.summary["num_clips"] == 1
    assert {"clips.parquet", "rejects.parquet", "clips", "stage.json"} <= {p.name for p in published.iterdir()}
    assert run_stage(cfg, "ingest").skipped


def test_hostile_rows_get_reasons_that_say_what_is_wrong(tmp_path):
    import os

    from PIL import Image

    folder = tmp_path / "videos"
    folder.mkdir()
    shutil.copy(BAD / "alpha_vp9.webm", folder / "ok.webm")
    outside = tmp_path / "private.webm"
    shutil.copy(BAD / "alpha_vp9.webm", outside)
    (folder / "link.webm").symlink_to(outside)  # inside the folder, pointing out of it
    (folder / "a_dir.mp4").mkdir()
    os.mkfifo(folder / "pipe.mp4")
    (folder / "zero.mp4").symlink_to("/dev/zero")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(folder / "still.png")
    rows = [{"path": p, "caption": f"caption of {p}"} for p in
            ("ok.webm", "link.webm", "a_dir.mp4", "pipe.mp4", "zero.mp4", "still.png")]
    manifest = write_manifest(folder, rows)
    summary, out = run_build(make_cfg(tmp_path, manifest), tmp_path)
    table = pd.read_parquet(out / "rejects.parquet")
    reasons = dict(zip(table["path"], table["reason"]))
    assert reasons["link.webm"].startswith("a symlink that points outside the manifest folder")
    assert reasons["a_dir.mp4"] == "a directory, not a video file"
    assert reasons["pipe.mp4"].startswith("not a regular file")
    assert reasons["zero.mp4"].startswith("a symlink that points outside")  # /dev/zero is outside too
    assert reasons["still.png"] == "a still image (png), not a video"
    assert dict(zip(table["path"], table["row"]))["still.png"] == 6  # rejects carry the manifest row
    assert summary["num_clips"] == 1

    allowed = make_cfg(tmp_path, manifest, allow_symlinks_outside=True)
    _, out = run_build(allowed, tmp_path, "allowed")
    reasons = rejects_of(out)
    assert reasons["link.webm"] == "duplicate of row 1 (same file content and window)"  # followed: same video
    assert reasons["zero.mp4"].startswith("not a regular file")


@pytest.mark.parametrize(("content", "message"), [
    (b"", r"the file is empty"),
    ("path,caption\na.mp4,caf\xe9 au lait\n".encode("latin-1"), r"not UTF-8 text .*save the CSV as UTF-8"),
    (b'path,caption\na.mp4,"unclosed quote\n', r"not a valid CSV .*quotes"),
    (b"path,caption\nx,a.mp4,a cat\ny,b.mp4,a dog\n", r"row 1 \(line 2\) has 3 fields, the header has 2"),
])
def test_csv_problems_name_the_file(tmp_path, content, message):
    manifest = tmp_path / "videos" / "m.csv"
    manifest.parent.mkdir()
    manifest.write_bytes(content)
    with pytest.raises(ManifestError, match=rf"m\.csv: {message}"):
        run_stage(make_cfg(tmp_path, manifest), "ingest")
