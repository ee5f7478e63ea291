"""Temporal consistency of generated clips, measured against the real clips.

Two statistics per clip, in [0, 1] pixel units (uint8 / 255), averaged over pixels:
- motion  = mean |x[f+1] - x[f]|: how much the picture changes from one frame to the next;
- flicker = mean |x[f+1] - 2 x[f] + x[f-1]|: how abruptly that change itself changes
  (steady motion has little, frame-to-frame jitter and popping have a lot).

A sample is temporally consistent with the real data when its statistics are close to those
of the real clip for the same caption: a frozen sample has motion near 0 against a moving real
clip, a noisy one has far more motion and flicker than the real clip. The evaluation reports,
per held-out caption, the gap |stat(sample) - stat(real)| (lower is better) for base and tuned.
This measures the amount and smoothness of change, not whether the motion is the right one.
"""

from __future__ import annotations

import numpy as np


def temporal_stats(video_FHW3: np.ndarray) -> dict[str, float]:
    """motion and flicker of one uint8 video (F, H, W, 3); F = 1 has no motion (0), F < 3 no flicker (0)."""
    v = np.asarray(video_FHW3)
    if v.dtype != np.uint8 or v.ndim != 4 or v.shape[-1] != 3:
        raise ValueError(f"temporal_stats wants uint8 video (F, H, W, 3); got {v.dtype} {v.shape}")
    x = v.astype(np.float64) / 255.0
    d1 = np.diff(x, axis=0)
    d2 = np.diff(x, n=2, axis=0)
    return {"motion": float(np.abs(d1).mean()) if len(d1) else 0.0,
            "flicker": float(np.abs(d2).mean()) if len(d2) else 0.0}


def temporal_gaps(real: list[np.ndarray], samples: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Per caption i: |stat(samples[i]) - stat(real[i])| for motion and flicker."""
    if len(real) != len(samples):
        raise ValueError(f"temporal_gaps: {len(real)} real clips but {len(samples)} samples")
    r = [temporal_stats(v) for v in real]
    s = [temporal_stats(v) for v in samples]
    return {k: np.array([abs(b[k] - a[k]) for a, b in zip(r, s)]) for k in ("motion", "flicker")}
