"""PyAV video I/O: timestamp-based picking, rotation, resize/crop, awkward files, atomic writes."""

from pathlib import Path

import av
import numpy as np
import pytest

from regdpo.data.video import (
    VideoError,
    count_decodable_duration,
    probe,
    read_clip,
    read_frames,
    write_mp4,
)

ROOT = Path(__file__).resolve().parents[1]
BAD = ROOT / "tests" / "assets" / "bad_videos"
SAMPLES = ROOT / "data" / "samples"
LEVEL = 9  # grey level step per frame index in synthetic videos


def _index_video(path: Path, n: int, fps: float, size: int = 32) -> Path:
    """A video whose frame i is a flat grey of level i * LEVEL, so a decoded frame tells its index."""
    frames = np.stack([np.full((size, size, 3), i * LEVEL, np.uint8) for i in range(n)])
    return write_mp4(path, frames, fps)


def _indices(clip: np.ndarray) -> list[int]:
    return [int(round(f[..., 0].mean() / LEVEL)) for f in clip]


def _raw_first_frame(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """First frame as stored (PyAV does not rotate), optionally scaled to (height, width)."""
    with av.open(str(path)) as c:
        frame = next(c.decode(video=0))
        if size is not None:
            frame = frame.reformat(height=size[0], width=size[1])
        return frame.to_ndarray(format="rgb24")


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.astype(np.float64).ravel(), b.astype(np.float64).ravel())[0, 1])


def test_picks_frames_by_timestamp(tmp_path):
    src = _index_video(tmp_path / "idx.mp4", n=27, fps=24)
    clip = read_clip(src, fps=8, num_frames=9, height=32, width=32)
    assert clip.shape == (9, 32, 32, 3) and clip.dtype == np.uint8
    assert _indices(clip) == [0, 3, 6, 9, 12, 15, 18, 21, 24]
    # from a start time: seek, then decode forward
    assert _indices(read_clip(src, fps=8, num_frames=5, height=16, width=16, start_s=0.5)) == [12, 15, 18, 21, 24]
    # upsampling repeats the previous frame (nearest-previous), never a later one
    assert _indices(read_clip(src, fps=48, num_frames=5, height=16, width=16)) == [0, 0, 1, 1, 2]


def test_clip_past_the_end_is_too_short(tmp_path):
    src = _index_video(tmp_path / "idx.mp4", n=27, fps=24)  # 1.125 s
    with pytest.raises(VideoError, match="too short") as err:
        read_clip(src, fps=8, num_frames=9, height=32, width=32, start_s=0.2)
    assert err.value.reason.startswith("too short")


def test_resize_keeps_aspect_and_centre_crops(tmp_path):
    bands = np.zeros((1, 32, 96, 3), np.uint8)
    bands[:, :, :32, 0] = bands[:, :, 32:64, 1] = bands[:, :, 64:, 2] = 255  # red | green | blue
    src = write_mp4(tmp_path / "bands.mp4", bands, 8)
    out = read_clip(src, fps=8, num_frames=1, height=16, width=16)[0].astype(int)
    assert out[..., 1].min() > 200 and out[..., 0].max() < 60 and out[..., 2].max() < 60  # only the green middle


def test_write_mp4_is_atomic_and_checks_input(tmp_path):
    frames = np.random.default_rng(0).integers(0, 255, (3, 32, 48, 3), dtype=np.uint8)
    out = write_mp4(tmp_path / "a.mp4", frames, 16)
    assert [p.name for p in tmp_path.iterdir()] == ["a.mp4"]  # no temp file left behind
    back = read_frames(out)
    assert back.shape == frames.shape
    with pytest.raises(ValueError, match="even"):
        write_mp4(tmp_path / "odd.mp4", frames[:, :31], 16)
    with pytest.raises(ValueError, match="uint8"):
        write_mp4(tmp_path / "f.mp4", frames.astype(np.float32), 16)
    assert not (tmp_path / "odd.mp4").exists()


def test_roundtrip_loses_little(tmp_path):
    yy, xx = np.mgrid[0:64, 0:64]
    smooth = np.stack([(xx * 4) % 256, (yy * 4) % 256, ((xx + yy) * 2) % 256], -1).astype(np.uint8)
    frames = np.stack([np.roll(smooth, i, axis=1) for i in range(5)])
    back = read_frames(write_mp4(tmp_path / "s.mp4", frames, 8)).astype(int)
    assert np.abs(back - frames.astype(int)).mean() < 4


def test_probe_reads_rotation_size_and_missing_duration():
    dog = probe(SAMPLES / "dog_living_room_rot180.mp4")
    assert (dog.width, dog.height, dog.rotation, dog.codec) == (1280, 720, 180, "h264")
    rot = probe(BAD / "rotated_90_three_frames.mov")
    assert rot.rotation == 90 and rot.display_size == (320, 568)
    nodur = probe(BAD / "no_duration_vp9.webm")
    assert nodur.duration_s is None and nodur.fps == pytest.approx(14.985, abs=0.01)
    assert count_decodable_duration(BAD / "no_duration_vp9.webm") == pytest.approx(4.94, abs=0.1)


def test_rotation_90_is_applied():
    path = BAD / "rotated_90_three_frames.mov"
    frames = read_frames(path)
    assert frames.shape == (3, 568, 320, 3)  # portrait, as displayed
    raw = _raw_first_frame(path)  # (320, 568): landscape as stored
    assert np.array_equal(frames[0], np.rot90(raw, k=-1))  # turned clockwise


def test_rotation_180_is_applied():
    path = SAMPLES / "dog_living_room_rot180.mp4"
    clip = read_clip(path, fps=8, num_frames=1, height=144, width=256)
    raw = _raw_first_frame(path, size=(144, 256))
    upright, as_stored = _corr(clip[0], np.rot90(raw, 2)), _corr(clip[0], raw)
    assert upright > 0.95 and upright > as_stored + 0.3


def test_out_of_order_storage_comes_out_in_presentation_order():
    path = BAD / "four_frames_unordered.mov"
    all_frames = read_frames(path)
    clip = read_clip(path, fps=32, num_frames=4, height=50, width=50)
    assert np.array_equal(clip, all_frames)
    with pytest.raises(VideoError, match="too short"):
        read_clip(path, fps=8, num_frames=9, height=32, width=32)


def test_corrupted_stream_keeps_clean_start_and_rejects_broken_part():
    path = BAD / "corrupted_h264.mp4"
    assert read_clip(path, fps=8, num_frames=9, height=32, width=32).shape == (9, 32, 32, 3)
    with pytest.raises(VideoError, match="undecodable"):
        read_clip(path, fps=8, num_frames=9, height=32, width=32, start_s=2.5)


@pytest.mark.parametrize("name", ["alpha_vp9.webm", "animated.gif", "no_duration_vp9.webm"])
def test_awkward_but_usable_files_give_rgb(name):
    clip = read_clip(BAD / name, fps=8, num_frames=9, height=32, width=32)
    assert clip.shape == (9, 32, 32, 3) and clip.dtype == np.uint8


def test_bad_inputs_raise_video_error_with_plain_reason(tmp_path):
    with pytest.raises(VideoError) as err:
        probe(BAD / "empty_zero_bytes.webm")
    assert err.value.reason == "empty file" and isinstance(err.value, ValueError)
    with pytest.raises(VideoError, match="file not found"):
        probe(tmp_path / "nope.mp4")
    text = tmp_path / "notes.mp4"
    text.write_text("not a video at all\n" * 10)
    with pytest.raises(VideoError, match="undecodable"):
        probe(text)
    audio = tmp_path / "tone.wav"
    with av.open(str(audio), "w") as c:
        stream = c.add_stream("pcm_s16le", rate=8000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        c.mux(stream.encode(frame) + stream.encode())
    with pytest.raises(VideoError, match="no video stream"):
        probe(audio)
