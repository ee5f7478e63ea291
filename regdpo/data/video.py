"""Video I/O with PyAV: probe, read a clip at a target spec, write and read normalised mp4s.

Everything here works on timestamps, not frame counts: a clip at `fps` starting at `start_s`
wants a frame for each target time t_k = start_s + k / fps, and gets the last source frame
shown at or before t_k (nearest-previous resampling). That is what a player would display at
t_k, so variable frame rates, B-frame reordering and odd container timestamps all come out right.

PyAV decodes frames as stored; it does NOT apply the display rotation (display matrix side
data or the older `rotate` tag). We apply it, so every array returned here is upright.
Times are seconds from the video stream's start (its `start_time`), so a stream whose first
frame is stamped a few milliseconds late still starts at 0.

Bad input raises `VideoError(path, reason)` with a short plain-words reason ("empty file",
"too short", "undecodable: ...") that ingestion records as a reject.
"""

from __future__ import annotations

import itertools
import math
import os
import uuid
from dataclasses import dataclass
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter

_EPS = 1e-6  # seconds; absorbs float error when comparing timestamps
# Frames decoded past a target before its pick is final. Decoders output in presentation order
# (even four_frames_unordered.mov, stored out of order, decodes in order); one interval of slack
# absorbs timestamp jitter without decoding frames nobody uses.
_REORDER_SLACK = 1


class VideoError(ValueError):
    """A video cannot be used; `.reason` is plain words such as "too short" or "empty file"."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class VideoInfo:
    """What the container and first frame say. width/height are as stored (before rotation);
    `rotation` is the clockwise turn in degrees (0/90/180/270) that makes the picture upright."""

    width: int
    height: int
    rotation: int
    fps: float
    duration_s: float | None
    codec: str
    container: str = ""  # FFmpeg's demuxer name, e.g. "mov,mp4,m4a,3gp,3g2,mj2", "png_pipe"

    @property
    def is_still_image(self) -> bool:
        """A single picture (PNG, JPEG, ...) that FFmpeg would happily open as a one-frame video."""
        return self.container.endswith("_pipe") or self.container == "image2"

    @property
    def display_size(self) -> tuple[int, int]:
        """(width, height) as shown to a viewer, i.e. after rotation."""
        return (self.height, self.width) if self.rotation in (90, 270) else (self.width, self.height)


def _open(path: str | os.PathLike):
    """Open a file and its first video stream, or raise VideoError with a plain reason."""
    p = Path(path)
    if not p.is_file():
        raise VideoError(p, "file not found")
    if p.stat().st_size == 0:
        raise VideoError(p, "empty file")
    try:
        container = av.open(str(p))
    except av.error.FFmpegError as err:
        raise VideoError(p, f"undecodable: cannot open ({err.strerror or err})") from None
    if not container.streams.video:
        container.close()
        raise VideoError(p, "no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return container, stream


def _rotation(frame: av.VideoFrame | None, stream) -> int:
    """Clockwise degrees to turn the stored picture upright, snapped to a multiple of 90.

    FFmpeg's display matrix angle (frame.rotation) is counter-clockwise, so it is negated,
    like the ffmpeg CLI's autorotate. Files without side data may carry a `rotate` tag,
    which is already clockwise.
    """
    ccw = float(frame.rotation) if frame is not None and frame.rotation else 0.0
    if ccw:
        cw = -ccw
    else:
        try:
            cw = float(stream.metadata.get("rotate", 0))
        except ValueError:
            cw = 0.0
    return int(round(cw / 90.0)) * 90 % 360


def _fps(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def _origin(stream) -> float:
    """Seconds of the stream's first timestamp; frame times are measured from here."""
    if stream.start_time is None or stream.time_base is None:
        return 0.0
    return float(stream.start_time * stream.time_base)


def _header_duration(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and container.duration > 0:
        return container.duration / av.time_base
    return None


def _decode(container, stream, path):
    """Yield decoded frames; decoder errors become VideoError("undecodable: ...")."""
    try:
        yield from container.decode(stream)
    except av.error.FFmpegError as err:
        raise VideoError(path, f"undecodable: {err.strerror or err}") from None


class VideoReader:
    """One open video: its `info` (probed from the first frame) and any number of clips, all
    from a single container (opening is a sizeable part of ingesting short clips).

        with VideoReader(path) as video:
            info = video.info
            frames = video.read_clip(fps=8, num_frames=9, height=64, width=64, start_s=1.0)
    """

    def __init__(self, path: str | os.PathLike):
        self.path = path
        self.container, self.stream = _open(path)
        self._info: VideoInfo | None = None
        self._decoded = False  # something was decoded: a pass from the start must seek back first
        # The probe's first frame and the decode it came from: a pass from the start continues
        # it instead of seeking back and decoding the opening frames twice.
        self._resume: tuple[av.VideoFrame, Iterator[av.VideoFrame]] | None = None

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc) -> None:
        self._resume = None
        self.container.close()

    def _from_start(self) -> Iterator[av.VideoFrame]:
        """Every frame from the start of the stream."""
        if self._resume is not None:
            first, rest = self._resume
            self._resume = None
            return itertools.chain([first], rest)
        if self._decoded:
            self.container.seek(0)
        self._decoded = True
        return _decode(self.container, self.stream, self.path)

    @property
    def info(self) -> VideoInfo:
        """Size, rotation, frame rate, duration (None when the container has none) and codec.

        Decodes the first frame: the display matrix arrives as frame side data, and a file whose
        first frame cannot be decoded is useless anyway.
        """
        if self._info is None:
            frames = self._from_start()
            first = next(frames, None)
            if first is None:
                raise VideoError(self.path, "undecodable: no frame could be decoded")
            self._resume = (first, frames)
            stream = self.stream
            self._info = VideoInfo(
                width=stream.codec_context.width or first.width,
                height=stream.codec_context.height or first.height,
                rotation=_rotation(first, stream),
                fps=_fps(stream),
                duration_s=_header_duration(self.container, stream),
                codec=stream.codec_context.name,
                container=self.container.format.name,
            )
        return self._info

    def decodable_duration(self) -> float:
        """Length in seconds found by decoding every frame (for containers without a duration).

        Stops at the first decoder error: what decoded cleanly up to there is the usable length.
        """
        origin, step = _origin(self.stream), 1.0 / (_fps(self.stream) or 25.0)
        end = 0.0
        try:
            for frame in self._from_start():
                if frame.time is not None:
                    end = max(end, frame.time - origin + step)
        except VideoError:
            pass
        return end

    def read_clip(self, *, fps: float, num_frames: int, height: int, width: int, start_s: float = 0.0) -> np.ndarray:
        """Decode `num_frames` frames at `fps` from `start_s`: uint8 (num_frames, height, width, 3), RGB, upright.

        Seeks to the keyframe at or before start_s and decodes forward. Each target time takes the
        last frame whose timestamp is <= it. A target past the end of the stream (later than the
        last frame plus its duration) raises "too short" rather than repeating the last frame; a
        decoder error part-way raises "undecodable" unless every target was already covered.
        """
        if fps <= 0 or num_frames < 1:
            raise ValueError(f"read_clip needs fps > 0 and num_frames >= 1; got fps={fps}, num_frames={num_frames}")
        targets = [start_s + k / fps for k in range(num_frames)]
        picker = _Picker(self.path, self.stream, targets, fps, (height, width))
        if start_s > 0 and self._seek(targets[0], picker.origin):
            self._resume, self._decoded = None, True
            if picker.run(_decode(self.container, self.stream, self.path), after_seek=True):
                return picker.out
            # the seek landed after start_s: decode from the beginning instead
            picker = _Picker(self.path, self.stream, targets, fps, (height, width))
        picker.run(self._from_start(), after_seek=False)
        return picker.out

    def _seek(self, t: float, origin: float) -> bool:
        try:
            pts = int((t + origin) / self.stream.time_base)
            self.container.seek(max(0, pts), stream=self.stream, backward=True)
            return True
        except av.error.FFmpegError:
            return False


def probe(path: str | os.PathLike) -> VideoInfo:
    """`VideoReader(path).info` (see there)."""
    with VideoReader(path) as video:
        return video.info


def count_decodable_duration(path: str | os.PathLike) -> float:
    """`VideoReader(path).decodable_duration()` (see there)."""
    with VideoReader(path) as video:
        return video.decodable_duration()


def _to_rgb(frame: av.VideoFrame, rotation: int, height: int, width: int,
            reformatter: VideoReformatter | None = None) -> np.ndarray:
    """Upright RGB uint8 (height, width, 3): scale so the picture covers the target, then centre-crop.

    Scaling happens in swscale at the stored orientation (cheap), rotation and crop in numpy.
    Alpha is composited on black, so transparent areas do not show stale colour values.
    """
    swap = rotation in (90, 270)
    disp_w, disp_h = (frame.height, frame.width) if swap else (frame.width, frame.height)
    scale = max(width / disp_w, height / disp_h)
    out_w, out_h = max(width, round(disp_w * scale)), max(height, round(disp_h * scale))
    stored_w, stored_h = (out_h, out_w) if swap else (out_w, out_h)
    alpha = any(c.is_alpha for c in frame.format.components)
    interp = "AREA" if scale < 1 else "BICUBIC"
    # One reformatter per video: it keeps swscale's context (filter set-up costs more than the
    # scaling itself for short clips) as long as the frame geometry does not change.
    img = (reformatter or VideoReformatter()).reformat(
        frame, width=stored_w, height=stored_h, format="rgba" if alpha else "rgb24", interpolation=interp)
    arr = img.to_ndarray()
    if alpha:
        a = arr[..., 3:4].astype(np.uint16)
        arr = ((arr[..., :3].astype(np.uint16) * a + 127) // 255).astype(np.uint8)
    if rotation:
        arr = np.rot90(arr, k=-(rotation // 90))  # negative k turns clockwise
    top, left = (arr.shape[0] - height) // 2, (arr.shape[1] - width) // 2
    return np.ascontiguousarray(arr[top : top + height, left : left + width])


def read_clip(
    path: str | os.PathLike, *, fps: float, num_frames: int, height: int, width: int, start_s: float = 0.0
) -> np.ndarray:
    """`VideoReader(path).read_clip(...)` (see there)."""
    with VideoReader(path) as video:
        return video.read_clip(fps=fps, num_frames=num_frames, height=height, width=width, start_s=start_s)


class _Picker:
    """Nearest-previous frame picking for a list of target times, converting as it goes.

    Frames may come out of the decoder in any order: a frame replaces a target's pick when it is
    later but still <= the target, which gives the same result as sorting by pts. A target is
    converted to RGB (and its frame released) once frames `_REORDER_SLACK` intervals past it have
    arrived, so memory stays small however long the clip.
    """

    def __init__(self, path, stream, targets: list[float], fps: float, size: tuple[int, int]):
        self.path, self.stream, self.targets, self.size = path, stream, targets, size
        self.clip_s = len(targets) / fps
        self.origin, self.step = _origin(stream), 1.0 / (_fps(stream) or 25.0)
        self.out = np.empty((len(targets), *size, 3), dtype=np.uint8)
        self.picks: list[tuple[float, av.VideoFrame | None] | None] = [None] * len(targets)
        self.first: tuple[float, av.VideoFrame] | None = None
        self.reformatter = VideoReformatter()
        self.rotation = 0
        self.done = 0  # targets [0, done) are written to self.out
        self.end_t = -math.inf  # when the latest frame seen stops being shown

    def run(self, frames: Iterator[av.VideoFrame], *, after_seek: bool) -> bool:
        """Fill self.out from `frames`; False if, after a seek, the first frame is already past
        the first target. Raises VideoError."""
        targets, error = self.targets, None
        try:
            for frame in frames:
                t = frame.time - self.origin if frame.time is not None else max(self.end_t, 0.0)
                if self.first is None:
                    if after_seek and t > targets[0] + _EPS:
                        return False
                    self.first, self.rotation = (t, frame), _rotation(frame, self.stream)
                dur = float(frame.duration * frame.time_base) if frame.duration and frame.time_base else self.step
                self.end_t = max(self.end_t, t + dur)
                for k in range(self.done, len(targets)):
                    pick = self.picks[k]
                    if t <= targets[k] + _EPS and (pick is None or pick[0] < t):
                        self.picks[k] = (t, frame)
                while self.done < len(targets) and t > targets[self.done] + _REORDER_SLACK * self.step:
                    self._finish(self.done)
                if self.done == len(targets):
                    return True
        except VideoError as err:
            error = err
        while self.done < len(targets) and targets[self.done] < self.end_t - _EPS:
            self._finish(self.done)
        if self.done == len(targets):
            return True
        if error is not None:
            raise error
        have = max(0.0, self.end_t - targets[0])
        reason = f"too short (needs {self.clip_s:.2f} s from {targets[0]:.2f} s, has {have:.2f} s)"
        raise VideoError(self.path, reason)

    def _finish(self, k: int) -> None:
        pick = self.picks[k]
        if pick is None:  # before the first frame: a stream starting a little late shows it from 0
            if self.first is None or self.first[0] > self.targets[k] + self.step:
                raise VideoError(self.path, f"no frame at {self.targets[k]:.2f} s (the stream starts later)")
            pick = self.first
        t, frame = pick
        prev = self.picks[k - 1] if k > 0 else None
        if prev is not None and prev[0] == t:
            self.out[k] = self.out[k - 1]
        else:
            self.out[k] = _to_rgb(frame, self.rotation, *self.size, self.reformatter)
        self.picks[k] = (t, None)  # release the decoded frame
        self.done = k + 1


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: float, *, crf: int = 15) -> Path:
    """Write uint8 RGB frames (F, H, W, 3) as an h264/yuv420p mp4, atomically.

    Encodes to a temporary name in the same folder and renames it into place, so a reader never
    sees half a file. crf 15 keeps re-encoding loss small. yuv420p needs even width and height.
    """
    path = Path(path)
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"write_mp4 wants uint8 frames shaped (F, H, W, 3), F >= 1; got {frames.dtype} {frames.shape}")
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"write_mp4 needs even height and width for yuv420p; got {h}x{w}")
    rate = Fraction(fps).limit_denominator(100_000)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp.mp4")
    try:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=rate)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            stream.time_base = 1 / rate
            # veryfast: a third of medium's time for the same crf at a few % more bytes; these
            # clips are an intermediate that is decoded once more (encode), not a deliverable
            stream.options = {"crf": str(crf), "preset": "veryfast"}
            for i, rgb in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
                frame.pts = i
                container.mux(stream.encode(frame))
            container.mux(stream.encode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_frames(path: str | os.PathLike) -> np.ndarray:
    """Every frame of a (normalised) video in presentation order: uint8 (F, H, W, 3) RGB, upright."""
    container, stream = _open(path)
    with container:
        frames = sorted(
            ((f.pts if f.pts is not None else i, f) for i, f in enumerate(_decode(container, stream, path))),
            key=lambda pair: pair[0],
        )
        if not frames:
            raise VideoError(path, "undecodable: no frame could be decoded")
        rotation = _rotation(frames[0][1], stream)
        arrays, reformatter = [], VideoReformatter()
        for _, f in frames:
            h, w = (f.width, f.height) if rotation in (90, 270) else (f.height, f.width)
            arrays.append(_to_rgb(f, rotation, h, w, reformatter))
        return np.stack(arrays)
