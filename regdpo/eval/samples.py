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
HEADINGS = {"real": "real clip", "base": "base model", "tuned": "tuned model"}
MIN_CELL = 256  # enlarge clips to at least this many pixels high (64-px tiles are unreadable)
GAP = 6  # pixels between tiles
FONT_PX = 18  # label size in the mp4 grid


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


def _fit(text: str, font, width: float) -> str:
    """`text`, cut with an ellipsis to fit `width` pixels in `font`."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text.rstrip() + "…"


def write_sample_grid(samples: list[SampleSet], path: str | Path, fps: float) -> Path:
    """An mp4: the column headings (real clip | base model | tuned model) once at the top, then one
    row per caption under a band naming it (clip, seed, caption cut to the row's width); tiles
    enlarged with nearest-neighbour to at least MIN_CELL pixels high."""
    num_frames, h, w = _check(samples)
    k = _scale((h, w))
    ch, cw = h * k, w * k
    font = _font(FONT_PX)
    band = FONT_PX + 12
    width = 3 * cw + 2 * GAP
    height = band + len(samples) * (band + ch)
    width, height = width + width % 2, height + height % 2  # yuv420p wants even sizes
    # Labels are drawn once; each frame pastes the enlarged cells under them.
    base = Image.new("RGB", (width, height), (20, 20, 20))
    draw = ImageDraw.Draw(base)
    for c, name in enumerate(COLUMNS):
        text = _fit(HEADINGS[name], font, cw - 8)
        x = c * (cw + GAP) + (cw - font.getlength(text)) / 2
        draw.text((x, 6), text, fill=(255, 255, 255), font=font)
    for r, s in enumerate(samples):
        y = band + r * (band + ch)
        label = _fit(f"{s.clip_id[:8]} · seed {s.seed} · {s.caption}", font, width - 8)
        draw.text((4, y + 6), label, fill=(200, 200, 200), font=font)
    frames = []
    for f in range(num_frames):
        canvas = base.copy()
        for r, s in enumerate(samples):
            y = band + r * (band + ch) + band
            for c, name in enumerate(COLUMNS):
                cell = Image.fromarray(s.videos[name][f]).resize((cw, ch), Image.NEAREST)
                canvas.paste(cell, (c * (cw + GAP), y))
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
    tile = 1.9  # inches per tile's height: about 190 px at dpi 100, whatever the clip's size
    title_in = 0.3 + 0.2 * (2 if note else 1)  # the title's lines and the first caption above the tiles
    width_in, height_in = tile * cols * w / h * 1.05 + 0.5, tile * len(rows) * 1.22 + title_in + 0.3
    fig, axes = plt.subplots(len(rows), cols, figsize=(width_in, height_in), squeeze=False)
    fig.subplots_adjust(left=0.4 / width_in, right=0.99, bottom=0.3 / height_in, top=1 - title_in / height_in,
                        wspace=0.05, hspace=0.22)
    for r, (s, name) in enumerate(rows):
        for c, k in enumerate(picks):
            ax = axes[r][c]
            ax.imshow(s.videos[name][k], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                # short upright labels: tight_layout keeps them inside the figure
                label = {"real": "real", "base": "base", "tuned": f"tuned\n|Δ| {s.tuned_vs_base():.2f}"}[name]
                ax.set_ylabel(label, fontsize=9)
            if name == "real" and c == 0:
                ax.set_title(textwrap.shorten(f"{s.clip_id[:8]} · seed {s.seed} · {s.caption}", 16 * cols + 10),
                             fontsize=9, loc="left")
            if r == len(rows) - 1:
                ax.set_xlabel(f"frame {k}", fontsize=8)
    title = ("held-out captions: real clip, base and tuned samples (same seed); "
             "|Δ| = mean |tuned - base| in 0..255")
    fig.suptitle(title + (f"\n{note}" if note else ""), fontsize=10, y=1 - 0.08 / height_in, va="top")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)
