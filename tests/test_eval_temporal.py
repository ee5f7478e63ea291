"""Temporal consistency statistics (regdpo/eval/temporal.py)."""

import numpy as np
import pytest

from regdpo.eval.temporal import temporal_gaps, temporal_stats


def _ramp(levels):
    return np.stack([np.full((8, 8, 3), v, np.uint8) for v in levels])


def test_a_still_video_has_no_motion_and_steady_change_has_no_flicker():
    assert temporal_stats(_ramp([100] * 5)) == {"motion": 0.0, "flicker": 0.0}
    steady = temporal_stats(_ramp([0, 51, 102, 153, 204]))
    assert steady["motion"] == pytest.approx(0.2) and steady["flicker"] == pytest.approx(0.0)
    jitter = temporal_stats(_ramp([0, 255, 0, 255, 0]))
    assert jitter["motion"] == pytest.approx(1.0) and jitter["flicker"] == pytest.approx(2.0)


def test_gaps_are_per_caption_and_absolute():
    real = [_ramp([0, 51, 102]), _ramp([9, 9, 9])]
    samples = [_ramp([7, 7, 7]), _ramp([0, 51, 102])]
    gaps = temporal_gaps(real, samples)
    np.testing.assert_allclose(gaps["motion"], [0.2, 0.2])
    with pytest.raises(ValueError, match="2 real clips but 1"):
        temporal_gaps(real, samples[:1])


def test_one_frame_and_bad_input():
    assert temporal_stats(_ramp([5])) == {"motion": 0.0, "flicker": 0.0}
    with pytest.raises(ValueError, match="uint8"):
        temporal_stats(np.zeros((3, 8, 8, 3), np.float32))
