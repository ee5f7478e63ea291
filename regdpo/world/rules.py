"""The synthetic world's rules: what may appear in a clip, how it moves, and how it is said.

A clip shows one to `max_objects` flat shapes (circle, square, triangle), each of its own colour,
on a plain dark background. Every shape keeps its colour, shape and size for the whole clip,
moves at a constant velocity and bounces off the walls (elastic reflection: the velocity
component into the wall flips, nothing else changes). Shapes drawn later pass in front of
earlier ones (occlusion). Speeds differ between shapes ("slowly" / "quickly").

Geometry is relative to the frame, so one set of rules serves every clip size: a shape's
half-extent is RADIUS_FRACTION of the frame's shorter side, speeds are frame widths per second.
Positions are the centre of the shape's bounding box in pixel coordinates (x right, y down; a
pixel's centre at (j + 0.5, i + 0.5)), which is also where the score looks for it.

The caption states what happens, in a fixed grammar that `parse_caption` reads back:

    two shapes. a red circle moves right slowly and bounces. a blue square moves up-left quickly.
    the blue square passes in front of the red circle.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

BACKGROUND = (20, 20, 28)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 50, 50), "green": (50, 190, 70), "blue": (60, 100, 235), "yellow": (235, 210, 50),
}
SHAPES = ("circle", "square", "triangle")
# unit direction vectors in image coordinates (y down)
DIRECTIONS: dict[str, tuple[float, float]] = {
    "right": (1.0, 0.0), "left": (-1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0),
    "up-right": (math.sqrt(0.5), -math.sqrt(0.5)), "up-left": (-math.sqrt(0.5), -math.sqrt(0.5)),
    "down-right": (math.sqrt(0.5), math.sqrt(0.5)), "down-left": (-math.sqrt(0.5), math.sqrt(0.5)),
}
SPEEDS = {"slowly": 0.25, "quickly": 0.5}  # frame widths per second
RADIUS_FRACTION = 0.16
# A caption says one shape passes in front of another when it hides at least this fraction of
# the other in some frame: a corner grazing a corner is not something a viewer sees as occlusion.
OCCLUSION_FRACTION = 0.3
# Shapes start where their first steps do not bounce, so the named direction is what is seen first.
CLEAR_START_STEPS = 2
COUNT_WORDS = {1: "one shape", 2: "two shapes", 3: "three shapes"}


@dataclass(frozen=True)
class WorldSpec:
    """Clip geometry: square frames of `size` pixels, `num_frames` at `fps`."""

    size: int = 32
    num_frames: int = 9
    fps: float = 8.0
    max_objects: int = 2

    def __post_init__(self):
        if self.size < 16 or self.size % 2:
            raise ValueError(f"world size must be an even number of pixels >= 16; got {self.size}")
        if self.num_frames < 3:
            raise ValueError(f"a world clip needs at least 3 frames to show motion; got {self.num_frames}")
        if self.fps <= 0:
            raise ValueError(f"world fps must be > 0; got {self.fps}")
        if not 1 <= self.max_objects <= len(COLOURS) or self.max_objects not in COUNT_WORDS:
            raise ValueError(f"max_objects must be in [1, {min(len(COLOURS), max(COUNT_WORDS))}]; got {self.max_objects}")


def radius(height: int, width: int) -> float:
    """A shape's half-extent in pixels for a frame of this size."""
    return RADIUS_FRACTION * min(height, width)


def speed_px(word: str, width: int, fps: float) -> float:
    """Pixels per frame of a speed word."""
    return SPEEDS[word] * width / fps


@dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    direction: str
    speed: str
    start: tuple[float, float]  # bounding-box centre (x, y) at frame 0


@dataclass
class Track:
    """A shape's simulated path: centres (F, 2) and the frames after which it bounced."""

    centres: np.ndarray
    bounces: list[int] = field(default_factory=list)


def simulate(shape: Shape, height: int, width: int, num_frames: int, fps: float) -> Track:
    """Constant velocity with elastic reflection off the walls, one step per frame."""
    r = radius(height, width)
    v = np.array(DIRECTIONS[shape.direction]) * speed_px(shape.speed, width, fps)
    lo, hi = np.array([r, r]), np.array([width - r, height - r])
    p = np.array(shape.start, dtype=np.float64)
    centres, bounces = [p.copy()], []
    for f in range(1, num_frames):
        p = p + v
        for axis in (0, 1):
            if p[axis] < lo[axis] or p[axis] > hi[axis]:
                wall = lo[axis] if p[axis] < lo[axis] else hi[axis]
                p[axis] = 2 * wall - p[axis]
                v[axis] = -v[axis]
                bounces.append(f)
        centres.append(p.copy())
    return Track(np.stack(centres), bounces)


def shape_mask(shape: str, centre: tuple[float, float], r: float, height: int, width: int) -> np.ndarray:
    """Boolean (H, W): the pixels whose centre lies inside `shape` (half-extent r) at `centre`."""
    ys, xs = np.mgrid[0:height, 0:width]
    dx, dy = xs + 0.5 - centre[0], ys + 0.5 - centre[1]
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "triangle":  # apex up: half-width grows linearly from 0 at the top to r at the bottom
        return (np.abs(dy) <= r) & (np.abs(dx) <= (dy + r) / 2)
    raise ValueError(f"unknown shape {shape!r}; the world has {', '.join(SHAPES)}")


@dataclass
class Scene:
    """One clip: its shapes (drawn in order: later ones in front) and their simulated tracks."""

    shapes: list[Shape]
    tracks: list[Track]
    height: int
    width: int
    fps: float

    @property
    def num_frames(self) -> int:
        return len(self.tracks[0].centres)

    def masks(self, frame: int) -> list[np.ndarray]:
        r = radius(self.height, self.width)
        return [shape_mask(s.shape, tuple(t.centres[frame]), r, self.height, self.width)
                for s, t in zip(self.shapes, self.tracks)]

    def occlusions(self) -> list[tuple[int, int]]:
        """(front, back) index pairs: the front shape hides OCCLUSION_FRACTION of the back one in some frame."""
        pairs = set()
        for f in range(self.num_frames):
            m = self.masks(f)
            for i in range(len(m)):
                for j in range(i):
                    if (m[i] & m[j]).sum() >= OCCLUSION_FRACTION * m[j].sum():
                        pairs.add((i, j))
        return sorted(pairs)

    def render(self) -> np.ndarray:
        """uint8 (F, H, W, 3)."""
        video = np.empty((self.num_frames, self.height, self.width, 3), np.uint8)
        for f in range(self.num_frames):
            video[f] = BACKGROUND
            for s, m in zip(self.shapes, self.masks(f)):
                video[f][m] = COLOURS[s.colour]
        return video

    def caption(self) -> str:
        return describe(self)


def sample_scene(rng: np.random.Generator, spec: WorldSpec) -> Scene:
    """A random scene: 1..max_objects shapes of distinct colours, random shape, direction, speed
    and start (anywhere the whole shape fits)."""
    h = w = spec.size
    r = radius(h, w)
    count = int(rng.integers(1, spec.max_objects + 1))
    shapes = []
    for colour in rng.choice(list(COLOURS), size=count, replace=False):
        shape, direction = str(rng.choice(SHAPES)), str(rng.choice(list(DIRECTIONS)))
        speed = str(rng.choice(list(SPEEDS)))
        step = np.array(DIRECTIONS[direction]) * speed_px(speed, w, spec.fps) * CLEAR_START_STEPS
        lo, hi = np.array([r, r]) + np.maximum(-step, 0), np.array([w - r, h - r]) - np.maximum(step, 0)
        start = (float(rng.uniform(lo[0], hi[0])), float(rng.uniform(lo[1], hi[1])))
        shapes.append(Shape(str(colour), shape, direction, speed, start))
    tracks = [simulate(s, h, w, spec.num_frames, spec.fps) for s in shapes]
    return Scene(shapes, tracks, h, w, spec.fps)


# ---- captions ----------------------------------------------------------------------------------


def _name(s: Shape) -> str:
    return f"{s.colour} {s.shape}"


def describe(scene: Scene) -> str:
    """The caption: count, then each shape's colour, shape, direction, speed and whether it
    bounces, then which shape passes in front of which."""
    parts = [COUNT_WORDS[len(scene.shapes)]]
    for s, t in zip(scene.shapes, scene.tracks):
        parts.append(f"a {_name(s)} moves {s.direction} {s.speed}" + (" and bounces" if t.bounces else ""))
    for front, back in scene.occlusions():
        parts.append(f"the {_name(scene.shapes[front])} passes in front of the {_name(scene.shapes[back])}")
    return ". ".join(parts) + "."


@dataclass(frozen=True)
class Described:
    """What a caption says about one shape."""

    colour: str
    shape: str
    direction: str
    speed: str
    bounces: bool


@dataclass(frozen=True)
class CaptionFacts:
    count: int
    shapes: tuple[Described, ...]
    in_front: tuple[tuple[str, str], ...]  # (front colour, back colour)


_C, _S = "|".join(COLOURS), "|".join(SHAPES)
_D, _V = "|".join(sorted(DIRECTIONS, key=len, reverse=True)), "|".join(SPEEDS)
_SHAPE_RE = re.compile(rf"a ({_C}) ({_S}) moves ({_D}) ({_V})( and bounces)?")
_FRONT_RE = re.compile(rf"the ({_C}) ({_S}) passes in front of the ({_C}) ({_S})")
_COUNT = {v: k for k, v in COUNT_WORDS.items()}


class CaptionError(ValueError):
    """A caption that is not in the world's grammar (the score cannot check it)."""


def parse_caption(caption: str) -> CaptionFacts:
    """The facts a world caption states; CaptionError for any other text."""
    sentences = [s.strip() for s in caption.strip().lower().rstrip(".").split(".")]
    if not sentences or sentences[0] not in _COUNT:
        raise CaptionError(f"not a world caption (it must start with {' / '.join(repr(w) for w in _COUNT)}): "
                           f"{caption!r}")
    count = _COUNT[sentences[0]]
    shapes, in_front = [], []
    for sentence in sentences[1:]:
        if m := _SHAPE_RE.fullmatch(sentence):
            shapes.append(Described(m[1], m[2], m[3], m[4], bool(m[5])))
        elif m := _FRONT_RE.fullmatch(sentence):
            in_front.append((m[1], m[3]))
        else:
            raise CaptionError(f"not a world caption: cannot read {sentence!r} in {caption!r}")
    if len(shapes) != count or len({s.colour for s in shapes}) != count:
        raise CaptionError(f"not a world caption: it says {sentences[0]!r} but describes {len(shapes)} shape(s) of "
                           f"{len({s.colour for s in shapes})} colour(s): {caption!r}")
    named = {s.colour for s in shapes}
    if any(f not in named or b not in named for f, b in in_front):
        raise CaptionError(f"not a world caption: an occlusion names a shape it does not describe: {caption!r}")
    return CaptionFacts(count, tuple(shapes), tuple(in_front))
