"""Side-by-side samples: real / base / tuned for the same captions and seeds.

`write_sample_grid` writes one mp4 whose frames show, per held-out caption, the real clip and
the two models' samples next to each other (labelled); `write_contact_sheet` a PNG with a few
frames of each. Small clips are enlarged with nearest-neighbour (pixels stay visible, nothing
is invented). Each sheet row says how far the tuned sample is from the base one, so two rows
that look identical are known to be identical (or not).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from regdpo.data.video import write_mp4

COLUMNS = ("real", "base", "tuned")
MIN_CELL = 128  # enlarge clips to at least this many pixels high
BAND = 22  # label band height in the mp4 grid


@dataclass
class SampleSet:
    """One held-out caption: its real clip and each model's sample (uint8 (F, H, W, 3))."""

    clip_id: str
    caption: str
    seed: int
    videos: dict[str, np.ndarray]  # keys: real, base, tuned

    def tuned_vs_base(self) -> float:
        """Mean absolute pixel difference between the tuned and the base sample (0..255)."""
        return float(np.abs(self.videos["tuned"].astype(np.int16) - self.videos["base"].astype(np.int16)).mean())


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _scale(shape_hw: tuple[int, int]) -> int:
    return max(1, -(-MIN_CELL // shape_hw[0]))


def _check(samples: list[SampleSet]) -> tuple[int, int, int]:
    if not samples:
        raise ValueError("no samples to show")
    shapes = {v.shape for s in samples for v in s.videos.values()}
    if len(shapes) != 1:
        raise ValueError(f"real and sampled videos must share one shape (F, H, W, 3); got {sorted(shapes)}")
    f, h, w, _ = shapes.pop()
    return f, h, w


def write_sample_grid(samples: list[SampleSet], path: str | Path, fps: float) -> Path:
    """An mp4: one row per caption (real | base | tuned), a label band over each row."""
    num_frames, h, w = _check(samples)
    k = _scale((h, w))
    ch, cw, gap = h * k, w * k, 4
    width = 3 * cw + 2 * gap
    height = len(samples) * (BAND + ch)
    width, height = width + width % 2, height + height % 2  # yuv420p wants even sizes
    font = _font(13)
    # Labels are drawn once; each frame pastes the enlarged cells under them.
    base = Image.new("RGB", (width, height), (20, 20, 20))
    draw = ImageDraw.Draw(base)
    for r, s in enumerate(samples):
        y = r * (BAND + ch)
        for c, name in enumerate(COLUMNS):
            label = f"{name} (seed {s.seed})" if name != "real" else f"real {s.clip_id[:8]}"
            draw.text((c * (cw + gap) + 3, y + 4), label, fill=(235, 235, 235), font=font)
    frames = []
    for f in range(num_frames):
        canvas = base.copy()
        for r, s in enumerate(samples):
            y = r * (BAND + ch) + BAND
            for c, name in enumerate(COLUMNS):
                cell = Image.fromarray(s.videos[name][f]).resize((cw, ch), Image.NEAREST)
                canvas.paste(cell, (c * (cw + gap), y))
        frames.append(np.asarray(canvas))
    return write_mp4(path, np.stack(frames), fps)


def write_contact_sheet(samples: list[SampleSet], out: str | Path, *, num_frames_shown: int = 4, note: str = ""
                        ) -> Path:
    """A PNG: per caption, rows real / base / tuned and a few frames across time, labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_frames, h, w = _check(samples)
    cols = min(num_frames_shown, num_frames)
    picks = [round(i * (num_frames - 1) / max(cols - 1, 1)) for i in range(cols)]
    rows = [(s, name) for s in samples for name in COLUMNS]
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.0 * cols + 1.4, 1.75 * len(rows) * h / w + 0.9),
                             squeeze=False)
    for r, (s, name) in enumerate(rows):
        for c, k in enumerate(picks):
            ax = axes[r][c]
            ax.imshow(s.videos[name][k], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                label = {"real": "real clip", "base": f"base\nseed {s.seed}",
                         "tuned": f"tuned\nseed {s.seed}\n|tuned-base|\n= {s.tuned_vs_base():.2f}/255"}[name]
                ax.set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center")
            if name == "real" and c == 0:
                ax.set_title(textwrap.shorten(f"{s.clip_id[:8]}: {s.caption}", 90), fontsize=8, loc="left")
            if r == len(rows) - 1:
                ax.set_xlabel(f"frame {k}", fontsize=8)
    title = "held-out captions: real clip, base and tuned samples (same seed)"
    fig.suptitle(title + (f"\n{note}" if note else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)
