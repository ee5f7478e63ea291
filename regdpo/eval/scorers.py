"""Sample scorers (`evaluate.scorers`): a number per generated video and its caption, compared
between base and tuned on the same captions and seeds.

Two kinds:
- `world`: the synthetic world's quality score (regdpo/world/score.py) and its three components
  (caption, motion, consistency); it needs world captions.
- `callable`: the user's own `(video, caption) -> number` (or a mapping of names to numbers),
  imported from a local file or module; with `options`, the function is a factory called once
  with them (a reward model that loads its checkpoint once). Python code is imported, never
  unpickled: what it loads, and how, is its own business.

Every metric gets a verdict row like the other sample metrics: the change tuned - base per
caption, its paired interval over the sampled captions, and the side the metric wants. The real
held-out clips are scored too, as the reference a perfect model would reach.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from regdpo.config import ScorerConfig
from regdpo.eval.metrics import verdict_row
from regdpo.eval.report import Block, fmt, fmt_signed
from regdpo.eval.stats import Interval, format_interval, mean_interval

SAMPLES = ("real", "base", "tuned")


@dataclass
class Scorer:
    """One configured scorer: `__call__(video, caption, where)` returns {metric: value}: a
    number is the metric `name`, a mapping's key k the metric `name.k` ("" names `name` itself)."""

    name: str
    description: str
    better: str  # "higher" or "lower"
    fn: Callable[[np.ndarray, str], Any]

    def __call__(self, video: np.ndarray, caption: str, where: str) -> dict[str, float]:
        try:
            out = self.fn(video, caption)
        except Exception as err:
            raise ScorerError(f"evaluate.scorers {self.name}: failed on {where}: {type(err).__name__}: {err}") from err
        values = _as_numbers(out, self.name, where)
        return {self.name if k == "" else f"{self.name}.{k}": v for k, v in values.items()}


class ScorerError(ValueError):
    """A scorer could not be loaded, failed, or returned something that is not a finite number."""


def _as_numbers(out: Any, name: str, where: str) -> dict[str, float]:
    """A number -> {"": x}; a mapping of names to numbers -> itself. Tensors and numpy scalars
    of one element count as numbers."""
    def number(x: Any, key: str) -> float:
        if callable(getattr(x, "item", None)):  # numpy scalars, one-element arrays and tensors
            try:
                x = x.item()
            except (ValueError, RuntimeError):  # more than one element: refused below
                pass
        if isinstance(x, bool) or not isinstance(x, numbers.Real):
            raise ScorerError(f"evaluate.scorers {name}: returned {type(x).__name__} for {where}{key}; a scorer must "
                              "return a number or a mapping of names to numbers")
        if not math.isfinite(float(x)):
            raise ScorerError(f"evaluate.scorers {name}: returned {x} for {where}{key}; scores must be finite")
        return float(x)

    if isinstance(out, Mapping):
        if not out:
            raise ScorerError(f"evaluate.scorers {name}: returned an empty mapping for {where}")
        return {str(k): number(v, f" ({k})") for k, v in out.items()}
    return {"": number(out, "")}


def _import_function(cfg: ScorerConfig) -> Callable:
    """The configured function, imported from `path` (as a module of its own) or `module`."""
    if cfg.path is not None:
        path = Path(cfg.path)
        if not path.is_file():
            raise ScorerError(f"evaluate.scorers {cfg.metric}: {path} not found; set path to your scorer's .py file")
        name = f"regdpo_scorer_{cfg.metric}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickling-free helpers in it look themselves up here
        try:
            spec.loader.exec_module(module)
        except Exception as err:
            del sys.modules[name]
            raise ScorerError(f"evaluate.scorers {cfg.metric}: importing {path} failed: {type(err).__name__}: {err}") from err
        where = str(path)
    else:
        try:
            module = importlib.import_module(cfg.module)
        except ImportError as err:
            raise ScorerError(f"evaluate.scorers {cfg.metric}: cannot import module {cfg.module!r}: {err}") from err
        where = f"module {cfg.module}"
    fn = getattr(module, cfg.function, None)
    if not callable(fn):
        raise ScorerError(f"evaluate.scorers {cfg.metric}: {where} has no function {cfg.function!r}")
    if cfg.options is not None:
        try:
            fn = fn(**cfg.options)
        except Exception as err:
            raise ScorerError(f"evaluate.scorers {cfg.metric}: {cfg.function}(**options) failed: "
                              f"{type(err).__name__}: {err}") from err
        if not callable(fn):
            raise ScorerError(f"evaluate.scorers {cfg.metric}: {cfg.function}(**options) returned "
                              f"{type(fn).__name__}, not a callable (video, caption) -> number")
    return fn


def _world(fps: float) -> Callable[[np.ndarray, str], dict[str, float]]:
    from regdpo.world.score import COMPONENTS, score_video

    def score(video: np.ndarray, caption: str) -> dict[str, float]:
        out = score_video(video, caption, fps)
        return {"": out["score"], **{c: out[c] for c in COMPONENTS}}  # the score itself, then its parts

    return score


def load_scorers(cfgs: list[ScorerConfig], *, fps: float) -> list[Scorer]:
    """The configured scorers, ready to call; `fps` is the clips' (the world's speeds need it)."""
    scorers = []
    for cfg in cfgs:
        if cfg.kind == "world":
            scorers.append(Scorer(cfg.metric, "the synthetic world's quality score (mean of caption, motion and "
                                              "consistency; 1 = obeys its caption and the rules)", "higher", _world(fps)))
        else:
            src = cfg.path or cfg.module
            scorers.append(Scorer(cfg.metric, f"{cfg.function} from {src}", cfg.better, _import_function(cfg)))
    return scorers


def score_samples(scorers: list[Scorer], samples: list[dict[str, Any]], *, num_resamples: int = 2000,
                  confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """`samples`: per caption {"clip_id", "caption", "videos": {"real", "base", "tuned"}}.

    Returns {"rows": one per (clip, video) with every metric, "metrics": per metric the real /
    base / tuned means with intervals and the change, "verdicts": verdict rows (unit: samples)}."""
    if not samples:
        raise ValueError("score_samples needs at least one sample")
    rows = []
    for s in samples:
        for which in SAMPLES:
            values: dict[str, float] = {}
            for scorer in scorers:
                values.update(scorer(s["videos"][which], s["caption"], f"the {which} video of held-out clip {s['clip_id']}"))
            rows.append({"clip_id": s["clip_id"], "video": which, **values})
    boot = dict(num_resamples=num_resamples, confidence=confidence, seed=seed)
    table = {which: [r for r in rows if r["video"] == which] for which in SAMPLES}
    metrics, verdicts = {}, []
    for scorer in scorers:
        names = [k for k in table["base"][0] if k == scorer.name or k.startswith(scorer.name + ".")]
        for m in names:
            v = {which: np.array([r[m] for r in table[which]]) for which in SAMPLES}
            change = mean_interval(v["tuned"] - v["base"], **boot)
            metrics[m] = {"description": scorer.description, "better": scorer.better,
                          **{which: _interval(v[which], boot) for which in SAMPLES}, "change": change.as_dict()}
            label = f"sample score {m}: " + (scorer.description if m == scorer.name else f"its {m.split('.', 1)[1]} part")
            verdicts.append(verdict_row(f"scorer:{m}", label, float(v["base"].mean()), float(v["tuned"].mean()), change,
                                        better=scorer.better, want=scorer.better, unit="samples",
                                        short=f"the {m} score"))
    return {"num_samples": len(samples), "rows": rows, "metrics": metrics, "verdicts": verdicts}


def _interval(values: np.ndarray, boot: dict[str, Any]) -> dict[str, Any]:
    iv: Interval = mean_interval(values, **boot)
    return iv.as_dict()


def score_blocks(scores: dict[str, Any]) -> list[Block]:
    """The report's section on the sample scores: per metric, the real clips (what a perfect
    model would reach), base and tuned, each with its interval, and the change."""
    def cell(d: dict[str, Any]) -> str:
        iv = Interval(**d)
        return f"{fmt(iv.estimate)} {format_interval(iv, fmt)}"

    rows = [[m, cell(v["real"]), cell(v["base"]), cell(v["tuned"]),
             f"{fmt_signed(v['change']['estimate'])} {format_interval(Interval(**v['change']), fmt)}", v["better"]]
            for m, v in scores["metrics"].items()]
    described = {m.split(".", 1)[0]: v["description"] for m, v in scores["metrics"].items()}
    return [Block("h2", "Sample scores"),
            Block("p", f"Each scorer judged the {scores['num_samples']} sampled held-out captions' real clip and the base "
                       "and tuned samples (same caption, same seed). Means with their intervals over the captions; the "
                       "change is paired per caption. " + " ".join(f"{k}: {d}." for k, d in described.items())),
            Block("table", header=["metric", "real clips", "base", "tuned", "change (tuned - base)", "want"], rows=rows)]
