"""The world's quality score: how well a video obeys the world's rules and its caption.

It sees only the pixels (uint8 (F, H, W, 3)) and the caption, so it scores real clips, decoded
latents and any model's samples alike. Three components, each in [0, 1], and the score, their mean:

- **caption** (does it show what the caption says): the number of shapes in each frame; per
  described shape, its colour is there, its shape is the one named, it starts moving in the
  named direction at the named speed, it bounces iff the caption says so; the shape said to pass
  in front is the one seen whole where the two meet. Each described shape, the count and each
  occlusion statement weigh one part.
- **motion** (do the shapes obey the rules): each shape's path is fitted with the world's own
  dynamics (constant velocity, elastic reflection off the walls); the fraction of frames within
  a pixel or so of the best fit. Teleports, stops, wobbles and swerves all miss it.
- **consistency** (frame to frame): every shape is there in every frame (no flicker or
  vanishing; passing behind another shape is not vanishing), keeps its size and shape (no melting or growing), and nothing else is drawn
  (pixels that are neither background nor a shape, beside a thin edge band).
Motion and consistency judge every shape drawn, named in the caption or not.

Shapes are found by colour: each pixel takes the nearest of the world's colours (or the
background) within COLOUR_TOLERANCE, else none; a shape is the largest connected region of its
colour of at least MIN_AREA_FRACTION of the smallest shape's area. Where two regions meet, one
may hide part of the other: a region's position is read only along the axes where its box has
its usual extent, its size and shape only where it is alone. Geometry (shape size, speeds,
tolerances) follows the frame size as the rules do; speeds need the clip's fps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from regdpo.world.rules import (BACKGROUND, COLOURS, DIRECTIONS, SHAPES, CaptionFacts, Described, parse_caption,
                                radius, speed_px)

COMPONENTS = ("caption", "motion", "consistency")
CHECKS = ("count", "colour", "shape", "direction", "speed", "bounce", "in_front", "fit", "persistence", "stability",
          "clean")
COLOUR_TOLERANCE = 75.0  # RGB distance; about half the distance between the two closest world colours
MIN_AREA_FRACTION = 0.3  # of the triangle's area (2 r^2), the smallest shape
AREA_TOLERANCE = 0.25  # relative change of a shape's area that still counts as the same size
# the world names an occlusion from 0.3 of the back shape hidden; rasterising alone moves an
# area by up to ~0.2 (a 10 or 11 pixel wide square)
CUT_FRACTION = 0.2
MAX_ANGLE_DEG = 25.0  # the start direction may deviate this much from the named one
SPEED_FACTOR = math.sqrt(2.0)  # "slowly" and "quickly" differ 2x: the geometric middle separates them
STRAY_FRACTION = 0.05  # stray pixels at which the clean-background check reaches 0
_PALETTE = np.array([BACKGROUND, *COLOURS.values()], dtype=np.float64)


def _tolerance_px(h: int, w: int) -> float:
    """How far a position may be off: rasterising moves a box centre by up to half a pixel,
    decoding blurs edges by a pixel or two at these sizes."""
    return max(1.5, 0.04 * min(h, w))


@dataclass
class Blob:
    """One colour's largest region in each frame (NaN / False where absent)."""

    colour: str
    present: np.ndarray  # (F,) bool
    area: np.ndarray  # (F,) pixels
    centre: np.ndarray  # (F, 2) bounding-box centre (x, y)
    extent: np.ndarray  # (F, 2) bounding-box width, height
    shape: list[str | None]  # best-matching world shape per frame
    masks: list[np.ndarray | None]
    touching: np.ndarray  # (F,) bool: meets another colour's region

    def _usual(self, values: np.ndarray) -> np.ndarray:
        """A whole region's value: the median where it is alone in 3 frames or more, else the
        largest seen (a shape behind another in most frames is cut in most of them)."""
        alone = self.present & ~self.touching
        if alone.sum() >= 3:
            return np.median(values[alone], axis=0)
        return np.max(values[self.present], axis=0)

    @property
    def own(self) -> np.ndarray:
        """Frames where its size and shape are its own: where it meets no other region (if it
        does in 3 frames or more), else where it is whole."""
        alone = self.present & ~self.touching
        return alone if alone.sum() >= 3 else self.whole()

    @property
    def usual_area(self) -> float:
        return float(self._usual(self.area)) if self.present.any() else math.nan

    def axis_clear(self, tolerance: float) -> np.ndarray:
        """(F, 2): the position along x / y can be read (the box has its usual extent along it;
        a shape in front cutting the region shrinks its box and moves its centre)."""
        if not self.present.any():
            return np.zeros((len(self.present), 2), bool)
        return self.present[:, None] & (self.extent >= self._usual(self.extent) - tolerance)

    def whole(self) -> np.ndarray:
        """(F,): the region has (nearly) its usual area: not cut by a shape in front."""
        return self.present & (self.area >= (1 - CUT_FRACTION) * self.usual_area)

    def hidden(self) -> np.ndarray:
        """(F,): absent, but within a run of absent frames whose neighbours on both sides (or the
        one side inside the clip) meet another region: passing behind it, not vanishing."""
        out = np.zeros(len(self.present), bool)
        f = 0
        while f < len(self.present):
            if self.present[f]:
                f += 1
                continue
            end = f
            while end < len(self.present) and not self.present[end]:
                end += 1
            sides = [self.touching[i] for i in (f - 1, end) if 0 <= i < len(self.present)]
            out[f:end] = bool(sides) and all(sides)
            f = end
        return out


def classify(video: np.ndarray) -> np.ndarray:
    """(F, H, W) labels: 0 background, 1.. the world's colours in COLOURS order, -1 none."""
    dist = np.linalg.norm(video.astype(np.float64)[..., None, :] - _PALETTE, axis=-1)  # (F, H, W, K)
    return np.where(dist.min(-1) <= COLOUR_TOLERANCE, dist.argmin(-1), -1)


def _template(shape: str, width: int, height: int) -> np.ndarray:
    """`shape` filling a box of width x height pixels (pixel centres strictly inside), drawn as
    the world draws it; a circle in a box that is not square becomes an ellipse."""
    ys, xs = np.mgrid[0:height, 0:width]
    rx, ry = width / 2, height / 2
    dx, dy = xs + 0.5 - rx, ys + 0.5 - ry
    if shape == "square":
        return np.ones((height, width), bool)
    if shape == "circle":
        return (dx / rx) ** 2 + (dy / ry) ** 2 < 1
    return np.abs(dx) < rx * (dy + ry) / (2 * ry)  # triangle, apex up


def _shape_of(box: np.ndarray, templates: dict[tuple[str, int, int], np.ndarray]) -> str:
    """The world shape whose template on the region's bounding box overlaps it best (IoU)."""
    best, best_iou = SHAPES[0], -1.0
    for s in SHAPES:
        key = (s, box.shape[1], box.shape[0])
        if key not in templates:
            templates[key] = _template(s, box.shape[1], box.shape[0])
        t = templates[key]
        iou = (t & box).sum() / max((t | box).sum(), 1)
        if iou > best_iou:
            best, best_iou = s, iou
    return best


def find_blobs(video: np.ndarray) -> tuple[dict[str, Blob], np.ndarray, np.ndarray]:
    """Per world colour seen in the video: its Blob. Also the (F,) number of shape-sized regions
    per frame (over all colours) and the (F, H, W) stray pixels (neither background nor a shape)."""
    num_frames, h, w, _ = video.shape
    labels = classify(video)
    min_area = MIN_AREA_FRACTION * 2 * radius(h, w) ** 2
    edge = max(1, round(min(h, w) / 16))  # decoded edges blend colours over a pixel or two
    counts = np.zeros(num_frames, int)
    covered = np.zeros(labels.shape, bool)
    found: dict[str, dict[int, np.ndarray]] = {}
    for f in range(num_frames):
        for k, colour in enumerate(COLOURS, start=1):
            regions, n = ndimage.label(labels[f] == k, structure=np.ones((3, 3)))
            if n == 0:
                continue
            sizes = ndimage.sum_labels(np.ones_like(regions), regions, index=np.arange(1, n + 1))
            big = np.nonzero(sizes >= min_area)[0]
            counts[f] += len(big)
            if len(big):
                covered[f] |= ndimage.binary_dilation(np.isin(regions, big + 1), iterations=edge)
                found.setdefault(colour, {})[f] = regions == int(np.argmax(sizes)) + 1
    templates: dict = {}
    blobs = {}
    for colour, per_frame in found.items():
        masks = [per_frame.get(f) for f in range(num_frames)]
        area, centre, extent = np.full(num_frames, np.nan), np.full((num_frames, 2), np.nan), np.full((num_frames, 2), np.nan)
        shape: list[str | None] = [None] * num_frames
        for f, m in per_frame.items():
            ys, xs = np.nonzero(m)
            area[f] = len(xs)
            centre[f] = ((xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2)
            extent[f] = (xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
            shape[f] = _shape_of(m[ys.min():ys.max() + 1, xs.min():xs.max() + 1], templates)
        blobs[colour] = Blob(colour, np.array([m is not None for m in masks]), area, centre, extent, shape, masks,
                             np.zeros(num_frames, bool))
    for a in blobs.values():
        for b in blobs.values():
            for f in np.nonzero(a.present & b.present)[0] if a is not b else ():
                a.touching[f] |= bool((ndimage.binary_dilation(a.masks[f], iterations=edge + 1) & b.masks[f]).any())
    return blobs, counts, (labels != 0) & ~covered


def _reflect(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Positions of an unbounded straight path folded back into [lo, hi] (elastic walls)."""
    span = hi - lo
    y = np.mod(x - lo, 2 * span)
    return lo + np.where(y > span, 2 * span - y, y)


@dataclass
class Fit:
    velocity: np.ndarray  # (2,) pixels per frame at frame 0
    hit: np.ndarray  # (F,) the frame's readable coordinates lie within tolerance of the path (NaN: none readable)
    # the fitted path meets a wall within the clip; None when it comes within the tolerance of
    # one without clearly crossing it (a viewer could not tell either)
    bounces: bool | None


def fit_path(blob: Blob, h: int, w: int, vmax: float, tolerance: float, step: float = 0.05) -> Fit | None:
    """The world path closest to the shape's readable positions: per axis, a start in the walls
    and a constant velocity (on a grid), reflected at the walls, minimising the summed absolute
    distance. None when an axis has fewer than 3 readable frames."""
    readable = blob.axis_clear(tolerance)
    r = radius(h, w)
    num_frames = len(blob.present)
    velocity, miss = np.zeros(2), np.zeros(num_frames)
    overshoot = -math.inf  # how far the unfolded path goes past a wall (negative: stays inside)
    for axis, extent in ((0, w), (1, h)):
        frames = np.nonzero(readable[:, axis])[0]
        lo, hi = r, extent - r
        if len(frames) < 3 or hi <= lo:
            return None
        starts = np.arange(lo, hi + step, 2 * step)
        speeds = np.arange(-vmax, vmax + step, step)
        unfolded = starts[:, None, None] + speeds[None, :, None] * frames[None, None, :]  # (P, V, T)
        err = np.abs(_reflect(unfolded, lo, hi) - blob.centre[frames, axis])
        p, v = np.unravel_index(err.sum(-1).argmin(), err.shape[:2])
        velocity[axis] = speeds[v]
        miss[frames] = np.maximum(miss[frames], err[p, v])
        path = starts[p] + speeds[v] * np.arange(num_frames)
        overshoot = max(overshoot, float(np.max(np.maximum(lo - path, path - hi))))
    seen = readable.any(axis=1)
    bounces = None if abs(overshoot) <= tolerance / 2 else overshoot > 0
    return Fit(velocity, np.where(seen, miss <= tolerance, np.nan), bounces)


def _angle_deg(a: np.ndarray, b: tuple[float, float]) -> float:
    na = float(np.linalg.norm(a))
    if na == 0:
        return 180.0
    return math.degrees(math.acos(float(np.clip(np.dot(a, b) / na, -1.0, 1.0))))


def _usual_shape(blob: Blob) -> str | None:
    seen = [blob.shape[f] for f in np.nonzero(blob.own)[0]]
    return max(sorted(set(seen)), key=seen.count) if seen else None


def _described(d: Described, blob: Blob | None, fit: Fit | None, speed: float) -> dict[str, float]:
    """The checks of one described shape (all 0 when its colour is missing in most frames)."""
    if blob is None or blob.present.mean() < 0.5:
        return {"colour": 0.0, "shape": 0.0, "direction": 0.0, "speed": 0.0, "bounce": 0.0}
    shape = float(np.mean([blob.shape[f] == d.shape for f in np.nonzero(blob.own)[0]]))
    if fit is None:
        return {"colour": 1.0, "shape": shape, "direction": 0.0, "speed": 0.0, "bounce": 0.0}
    moved = float(np.linalg.norm(fit.velocity))
    return {"colour": 1.0, "shape": shape,
            "direction": float(_angle_deg(fit.velocity, DIRECTIONS[d.direction]) <= MAX_ANGLE_DEG),
            "speed": float(speed / SPEED_FACTOR <= moved <= speed * SPEED_FACTOR),
            "bounce": float(fit.bounces is None or fit.bounces == d.bounces)}


def _in_front(front: Blob | None, back: Blob | None) -> float:
    """1 when, where the two regions meet, the front shape is seen whole and the back one cut
    in some frame, and never the other way round; else 0."""
    if front is None or back is None:
        return 0.0
    meet = front.present & back.present & front.touching & back.touching
    right = (meet & front.whole() & ~back.whole()).any()
    wrong = (meet & back.whole() & ~front.whole()).any()
    return float(right and not wrong)


def _stable(blob: Blob) -> float:
    """Fraction of the frames where its size and shape are its own in which they are the usual ones."""
    usual_area, usual_shape = blob.usual_area, _usual_shape(blob)
    return float(np.mean([abs(blob.area[f] / usual_area - 1) <= AREA_TOLERANCE and blob.shape[f] == usual_shape
                          for f in np.nonzero(blob.own)[0]]))


def score_video(video: np.ndarray, caption: str | CaptionFacts, fps: float) -> dict[str, float]:
    """The score and its components for one uint8 video (F, H, W, 3) and its world caption.

    Returns {"score", "caption", "motion", "consistency"} in [0, 1] and the checks behind them
    (CHECKS: count ... clean; in_front is NaN when the caption names no occlusion). Raises
    CaptionError for a caption outside the world's grammar."""
    v = np.asarray(video)
    if v.dtype != np.uint8 or v.ndim != 4 or v.shape[-1] != 3 or len(v) < 3:
        raise ValueError(f"score_video wants uint8 video (F, H, W, 3) with F >= 3; got {v.dtype} {v.shape}")
    if fps <= 0:
        raise ValueError(f"score_video needs the clip's fps > 0; got {fps}")
    facts = parse_caption(caption) if isinstance(caption, str) else caption
    _, h, w, _ = v.shape
    blobs, counts, stray = find_blobs(v)
    tolerance = _tolerance_px(h, w)
    fastest = max(speed_px(word, w, fps) for word in ("slowly", "quickly"))
    fits = {c: fit_path(b, h, w, 1.5 * fastest, tolerance) for c, b in blobs.items()}

    described = [_described(d, blobs.get(d.colour), fits.get(d.colour), speed_px(d.speed, w, fps))
                 for d in facts.shapes]
    front = [_in_front(blobs.get(f), blobs.get(b)) for f, b in facts.in_front]
    checks = {k: float(np.mean([c[k] for c in described])) for k in described[0]}
    hidden = sum(b.hidden().astype(int) for b in blobs.values())
    checks["count"] = float(np.mean(counts + hidden == facts.count))
    checks["in_front"] = float(np.mean(front)) if front else math.nan
    objects = list(blobs.values())
    checks["fit"] = float(np.mean([np.nanmean(f.hit) if f is not None else 0.0 for f in fits.values()])) if objects else 0.0
    checks["persistence"] = float(np.mean([(b.present | b.hidden()).mean() for b in objects])) if objects else 0.0
    checks["stability"] = float(np.mean([_stable(b) for b in objects])) if objects else 0.0
    checks["clean"] = float(np.clip(1 - stray.mean() / STRAY_FRACTION, 0, 1)) if objects else 0.0

    parts = {"caption": float(np.mean([*(np.mean(list(c.values())) for c in described), checks["count"], *front])),
             "motion": checks["fit"],
             "consistency": float(np.mean([checks["persistence"], checks["stability"], checks["clean"]]))}
    return {"score": float(np.mean(list(parts.values()))), **parts, **{k: checks[k] for k in CHECKS}}
