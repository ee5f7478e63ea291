"""The synthetic world: deterministic clips and captions on disk, and its quality score (real
clips near the top, each corruption lower in its own component, noise at the bottom)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from regdpo.data.manifest import read_manifest
from regdpo.data.video import read_frames, write_mp4
from regdpo.world import CaptionError, WorldSpec, parse_caption, scene, scenes, write_world
from regdpo.world.rules import COLOURS, DIRECTIONS, Scene, Shape, radius, shape_mask, simulate, speed_px
from regdpo.world.score import score_video

SPEC = WorldSpec(size=32, num_frames=9, fps=8.0)


def test_clips_are_deterministic_per_seed_and_index():
    a, b = scene(SPEC, 3, 5), scene(SPEC, 3, 5)
    assert a.caption() == b.caption() and np.array_equal(a.render(), b.render())
    # clip i does not depend on how many clips are asked for, and another seed is another world
    assert list(scenes(SPEC, 3, 2, first=5))[0].caption() == a.caption()
    assert [s.caption() for s in scenes(SPEC, 3, 20)] != [s.caption() for s in scenes(SPEC, 4, 20)]


def test_motion_obeys_the_rules():
    for sc in scenes(SPEC, 0, 50):
        r = radius(sc.height, sc.width)
        for shape, track in zip(sc.shapes, sc.tracks):
            c = track.centres
            assert (c >= r - 1e-9).all() and (c <= sc.width - r + 1e-9).all()  # inside the walls
            step = np.linalg.norm(np.diff(c, axis=0), axis=1)
            speed = speed_px(shape.speed, sc.width, sc.fps)
            # constant speed between bounces: a step's length is the speed unless a wall folded it
            free = [i for i in range(len(step)) if i + 1 not in track.bounces]
            assert np.allclose(step[free], speed)
            assert not {1, 2} & set(track.bounces)  # the named direction is what is seen first


def test_captions_say_what_happens_and_read_back():
    seen = set()
    for sc in scenes(SPEC, 1, 200):
        facts = parse_caption(sc.caption())
        assert facts.count == len(sc.shapes)
        for said, shape, track in zip(facts.shapes, sc.shapes, sc.tracks):
            assert (said.colour, said.shape, said.direction, said.speed) == (
                shape.colour, shape.shape, shape.direction, shape.speed)
            assert said.bounces == bool(track.bounces)
        seen |= {len(sc.shapes), *((1, 1) if facts.in_front else ())}
    assert seen >= {1, 2}
    with pytest.raises(CaptionError, match="not a world caption"):
        parse_caption("A cat sits on a mat.")
    with pytest.raises(CaptionError, match="describes 1 shape"):
        parse_caption("two shapes. a red circle moves up slowly.")


def test_write_world_is_a_manifest_ingest_reads(tmp_path):
    out = tmp_path / "world"
    manifest = write_world(out, 6, seed=2, spec=SPEC)
    rows = read_manifest(manifest)
    assert [r.caption for r in rows] == [s.caption() for s in scenes(SPEC, 2, 6)]
    first = read_frames(out / rows[0].path)
    assert first.shape == (9, 32, 32, 3)
    assert np.abs(first.astype(int) - scene(SPEC, 2, 0).render().astype(int)).mean() < 4  # h264 at crf 15
    assert json.loads((out / "world.json").read_text())["num_clips"] == 6
    mtime = manifest.stat().st_mtime_ns
    assert write_world(out, 6, seed=2, spec=SPEC) == manifest and manifest.stat().st_mtime_ns == mtime  # reused
    with pytest.raises(ValueError, match="another world"):
        write_world(out, 7, seed=2, spec=SPEC)
    with open(manifest) as f:
        assert next(csv.reader(f)) == ["path", "caption"]


# ---- the score ---------------------------------------------------------------------------------


def one_shape(colour="red", shape="square", direction="right", speed="quickly", start=(10.0, 16.0)) -> Scene:
    s = Shape(colour, shape, direction, speed, start)
    return Scene([s], [simulate(s, 32, 32, SPEC.num_frames, SPEC.fps)], 32, 32, SPEC.fps)


def draw(sc: Scene, centres=None, radii=None, colours=None) -> np.ndarray:
    """Render `sc` with its first shape's per-frame centre, radius or colour replaced."""
    video = np.empty((sc.num_frames, 32, 32, 3), np.uint8)
    shape = sc.shapes[0]
    for f in range(sc.num_frames):
        video[f] = (20, 20, 28)
        c = sc.tracks[0].centres[f] if centres is None else centres[f]
        r = radius(32, 32) if radii is None else radii[f]
        colour = shape.colour if colours is None else colours[f]
        if colour is not None:
            video[f][shape_mask(shape.shape, tuple(c), r, 32, 32)] = COLOURS[colour]
    return video


def test_real_clips_score_near_the_top():
    clips = list(scenes(SPEC, 11, 60))
    scores = [score_video(sc.render(), sc.caption(), SPEC.fps) for sc in clips]
    total = np.array([s["score"] for s in scores])
    assert total.mean() >= 0.97 and total.min() >= 0.8
    for component in ("caption", "motion", "consistency"):
        assert np.mean([s[component] for s in scores]) >= 0.95


def test_real_clips_score_near_the_top_through_h264(tmp_path):
    scores = []
    for i, sc in enumerate(scenes(SPEC, 12, 12)):
        decoded = read_frames(write_mp4(tmp_path / f"{i}.mp4", sc.render(), SPEC.fps))
        scores.append(score_video(decoded, sc.caption(), SPEC.fps)["score"])
    assert np.mean(scores) >= 0.95


def test_each_corruption_lowers_its_own_component():
    sc = one_shape()
    caption = sc.caption()
    real = score_video(draw(sc), caption, SPEC.fps)
    assert real["score"] == pytest.approx(1.0)
    f = sc.num_frames

    # the caption's colour, shape and direction are wrong; the motion and consistency are not
    for video, wrong in ((draw(sc, colours=["blue"] * f), "colour"),
                         (draw(one_shape(shape="circle")), "shape"),
                         (draw(sc)[::-1].copy(), "direction")):
        got = score_video(video, caption, SPEC.fps)
        assert got[wrong] == 0.0, wrong
        assert got["caption"] <= 0.9 and got["motion"] == 1.0 and got["consistency"] == 1.0, wrong

    # teleport: two frames jump 8 px off the path
    centres = sc.tracks[0].centres.copy()
    centres[4:6, 1] += 8
    got = score_video(draw(sc, centres=centres), caption, SPEC.fps)
    assert got["motion"] <= 7 / 9 + 1e-9 and got["consistency"] == 1.0 and got["caption"] == 1.0

    # frames out of order: the path is no straight bouncing line
    got = score_video(draw(sc)[[0, 4, 2, 6, 1, 5, 3, 7, 8]], caption, SPEC.fps)
    assert got["motion"] < 0.7 and got["consistency"] == 1.0

    # melting: the shape shrinks to half its size and grows back
    r = radius(32, 32)
    radii = r * np.array([1, 1, 1, 0.6, 0.5, 0.6, 1, 1, 1])
    got = score_video(draw(sc, radii=radii), caption, SPEC.fps)
    assert got["stability"] <= 6 / 9 + 1e-9 and got["consistency"] < 0.9 and got["caption"] >= 0.9

    # flicker: the shape vanishes in the open for two frames
    got = score_video(draw(sc, colours=["red"] * 4 + [None] * 2 + ["red"] * 3), caption, SPEC.fps)
    assert got["persistence"] == pytest.approx(7 / 9) and got["count"] == pytest.approx(7 / 9)
    assert got["consistency"] < 1.0

    # stray paint: a second, unnamed shape is both a count error and an extra object
    extra = draw(sc)
    extra[:, 2:8, 24:30] = COLOURS["yellow"]
    got = score_video(extra, caption, SPEC.fps)
    assert got["count"] == 0.0 and got["caption"] < 1.0


def test_noise_scores_at_the_bottom():
    rng = np.random.default_rng(0)
    captions = [sc.caption() for sc in scenes(SPEC, 13, 10)]
    noise = [score_video(rng.integers(0, 256, (9, 32, 32, 3), dtype=np.uint8), c, SPEC.fps)["score"]
             for c in captions]
    blank = score_video(np.full((9, 32, 32, 3), 20, np.uint8), captions[0], SPEC.fps)["score"]
    assert max(noise) < 0.1 and blank == 0.0


def test_score_refuses_what_it_cannot_judge():
    with pytest.raises(ValueError, match="uint8 video"):
        score_video(np.zeros((9, 32, 32, 3), np.float32), "one shape. a red circle moves up slowly.", 8.0)
    with pytest.raises(CaptionError):
        score_video(np.zeros((9, 32, 32, 3), np.uint8), "a red circle", 8.0)


@pytest.mark.parametrize("direction", sorted(DIRECTIONS))
def test_every_direction_reads_back(direction):
    sc = one_shape(direction=direction, speed="slowly", start=(16.0, 16.0))
    assert score_video(sc.render(), sc.caption(), SPEC.fps)["direction"] == 1.0


def test_cli_writes_a_world(tmp_path):
    from typer.testing import CliRunner

    from regdpo.cli import app

    result = CliRunner().invoke(app, ["world", str(tmp_path / "w"), "-n", "3", "--seed", "4"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(tmp_path / "w" / "manifest.csv")
    assert [r.caption for r in read_manifest(tmp_path / "w" / "manifest.csv")] == [
        s.caption() for s in scenes(WorldSpec(), 4, 3)]
    bad = CliRunner().invoke(app, ["world", str(tmp_path / "v"), "--size", "15"])
    assert bad.exit_code == 2 and "even number of pixels" in bad.output
