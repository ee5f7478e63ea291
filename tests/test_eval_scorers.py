"""Sample scorers (evaluate.scorers): the world's score and a user's own callable, loaded from a
local file or module without pickle, each with a verdict and an interval."""

from __future__ import annotations

import numpy as np
import pytest

from regdpo.config import ConfigError, EvaluateConfig, ScorerConfig, load_config
from regdpo.eval.scorers import ScorerError, load_scorers, score_samples
from regdpo.world import WorldSpec, scenes

REWARDS = '''
import numpy as np

def brightness(video, caption):
    return float(np.asarray(video).mean()) / 255.0

def parts(video, caption):
    return {"red": float(video[..., 0].mean()), "words": len(caption.split())}

class Reward:  # a reward model that loads its checkpoint once
    def __init__(self, scale):
        self.scale = scale
    def __call__(self, video, caption):
        return np.float32(self.scale * video.mean())

def nan(video, caption):
    return float("nan")

def text(video, caption):
    return "good"

def broken(video, caption):
    raise RuntimeError("checkpoint missing")

def make_nothing():
    return 3
'''


@pytest.fixture
def rewards(tmp_path):
    path = tmp_path / "rewards.py"
    path.write_text(REWARDS)
    return path


def _samples(n=6, brighter=0):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        base = rng.integers(0, 200, (3, 8, 8, 3), dtype=np.uint8)
        out.append({"clip_id": f"c{i}", "caption": "a clip", "videos": {
            "real": base, "base": base, "tuned": np.clip(base.astype(int) + brighter, 0, 255).astype(np.uint8)}})
    return out


def test_a_user_callable_gets_a_verdict_with_an_interval(rewards):
    scorers = load_scorers([ScorerConfig(kind="callable", path=str(rewards), function="brightness")], fps=8)
    got = score_samples(scorers, _samples(brighter=20), num_resamples=200)
    (row,) = got["verdicts"]
    assert row["metric"] == "scorer:brightness" and row["unit"] == "samples" and row["verdict"] == "better"
    assert row["change"] == pytest.approx(20 / 255, abs=1e-3)
    assert row["interval"]["n"] == 6 and row["interval"]["low"] > 0
    assert {r["video"] for r in got["rows"]} == {"real", "base", "tuned"} and len(got["rows"]) == 18
    assert set(got["metrics"]["brightness"]) >= {"real", "base", "tuned", "change"}
    # the same change where lower is better is a worse tuned model
    worse = load_scorers([ScorerConfig(kind="callable", path=str(rewards), function="brightness", better="lower")], fps=8)
    assert score_samples(worse, _samples(brighter=20), num_resamples=200)["verdicts"][0]["verdict"] == "worse"


def test_mappings_factories_and_modules(rewards, monkeypatch):
    monkeypatch.syspath_prepend(str(rewards.parent))
    scorers = load_scorers([
        ScorerConfig(kind="callable", path=str(rewards), function="parts", name="p"),
        ScorerConfig(kind="callable", module="rewards", function="Reward", options={"scale": 2.0}),
    ], fps=8)
    got = score_samples(scorers, _samples(n=3), num_resamples=100)
    assert [v["metric"] for v in got["verdicts"]] == ["scorer:p.red", "scorer:p.words", "scorer:Reward"]
    assert got["metrics"]["p.words"]["base"]["estimate"] == 2.0


@pytest.mark.parametrize("function, message", [("nan", "must be finite"), ("text", "returned str"),
                                               ("broken", "failed on the real video of held-out clip c0: RuntimeError")])
def test_bad_scores_name_the_scorer_and_the_sample(rewards, function, message):
    scorers = load_scorers([ScorerConfig(kind="callable", path=str(rewards), function=function)], fps=8)
    with pytest.raises(ScorerError, match=f"evaluate.scorers {function}: .*{message}"):
        score_samples(scorers, _samples(n=2))


def test_bad_scorer_sources_fail_when_loaded(rewards, tmp_path):
    with pytest.raises(ScorerError, match="not found"):
        load_scorers([ScorerConfig(kind="callable", path=str(tmp_path / "none.py"), function="f")], fps=8)
    with pytest.raises(ScorerError, match="has no function 'missing'"):
        load_scorers([ScorerConfig(kind="callable", path=str(rewards), function="missing")], fps=8)
    with pytest.raises(ScorerError, match="cannot import module"):
        load_scorers([ScorerConfig(kind="callable", module="no_such_module_here", function="f")], fps=8)
    with pytest.raises(ScorerError, match=r"brightness\(\*\*options\) failed: TypeError"):
        load_scorers([ScorerConfig(kind="callable", path=str(rewards), function="brightness", options={})], fps=8)
    with pytest.raises(ScorerError, match="returned int, not a callable"):
        load_scorers([ScorerConfig(kind="callable", path=str(rewards), function="make_nothing", options={})], fps=8)


def test_scorer_config_is_checked(tmp_path):
    for bad, message in (({"kind": "callable", "path": "r.py"}, "needs `function`"),
                         ({"kind": "callable", "path": "r.py", "module": "m", "function": "f"}, "exactly one of"),
                         ({"kind": "callable", "path": "r.pkl", "function": "f"}, "Python file"),
                         ({"kind": "world", "path": "r.py"}, "takes no path")):
        with pytest.raises(ValueError, match=message):
            ScorerConfig(**bad)
    with pytest.raises(ValueError, match="named alike"):
        EvaluateConfig(scorers=[{"kind": "world"}, {"kind": "callable", "path": "w.py", "function": "world"}])
    with pytest.raises(ValueError, match="num_samples is 0"):
        EvaluateConfig(scorers=[{"kind": "world"}], samples={"num_samples": 0})
    cfg_path = tmp_path / "sub" / "config.yaml"
    cfg_path.parent.mkdir()
    cfg_path.write_text("workdir: run\nmodel: {preset: tiny}\ningest: {manifest: m.csv}\n"
                        "evaluate: {scorers: [{kind: callable, path: ../rewards.py, function: brightness}]}\n")
    cfg = load_config(cfg_path)
    assert cfg.evaluate.scorers[0].path == str(tmp_path / "rewards.py")  # relative to the config file
    with pytest.raises(ConfigError, match="scorers.0.kind"):
        load_config(cfg_path, {"evaluate.scorers": [{"kind": "clip"}]})


def test_world_scorer_judges_world_clips():
    spec = WorldSpec(size=32)
    clips = list(scenes(spec, 5, 6))
    rng = np.random.default_rng(1)
    samples = [{"clip_id": f"c{i}", "caption": sc.caption(), "videos": {
        "real": sc.render(), "base": rng.integers(0, 256, sc.render().shape, dtype=np.uint8), "tuned": sc.render()}}
        for i, sc in enumerate(clips)]
    got = score_samples(load_scorers([ScorerConfig(kind="world")], fps=spec.fps), samples, num_resamples=200)
    assert [v["metric"] for v in got["verdicts"]] == ["scorer:world", "scorer:world.caption", "scorer:world.motion",
                                                      "scorer:world.consistency"]
    world = got["metrics"]["world"]
    assert world["real"]["estimate"] > 0.95 and world["base"]["estimate"] < 0.1
    assert got["verdicts"][0]["verdict"] == "better"
