"""The report's first sentence: did the preference margin move, did the fit of the real clips get
better or worse, and what that means in plain words.

The margin s = win gap - lose gap (and its implicit accuracy) is what preference training is
about, so it decides. The two denoising errors are its components: read for what they say about
the real clips, never counted as votes of their own (a model that fits everything better lowers
both, which is one effect, not a "better" and a "worse"). A run whose real-clip error rose while
s fell (METHOD.md's "cheating" path), on the held-out pairs or at the end of training, is never
called better, whatever else moved.

Verdict rows are read by role (stats.role_of: margin, component, samples); a row of any
other metric (a sample metric, a scorer) with an interval joins the sentence's last clause.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from regdpo.eval.plots import ema, series
from regdpo.eval.report import change_cell, fmt_signed
from regdpo.eval.stats import BETTER, COMPONENT, MARGIN, SAME, WORSE, role_of

# Labels: short, for tables (compare) and the start of the sentence.
LABEL_BETTER = "better"
LABEL_WORSE = "worse"
LABEL_WORSE_REAL = "worse on the real clips"
LABEL_DEGENERATE = "not better: degenerate training"
LABEL_FIT_ONLY = "fit better, margin unchanged"
LABEL_SAME = "no measurable change"


@dataclass(frozen=True)
class TrainingEnd:
    """Moving averages of the training curves at the last step (as the report's plots draw them)."""

    s: float
    win_gap: float
    lose_gap: float

    @property
    def degenerate(self) -> bool:
        """The win gap ended positive while s is negative: the model fits the real clips worse than
        its reference and the negatives even worse."""
        return self.win_gap > 0 and self.s < 0


def training_end(rows: Sequence[dict[str, Any]], min_steps: int = 4) -> TrainingEnd | None:
    """The end of training's s, win and lose gap, or None when fewer than `min_steps` steps logged them."""
    ends = {}
    for key in ("s", "win_gap", "lose_gap"):
        _, y = series(list(rows), key)
        if len(y) < min_steps:
            return None
        ends[key] = float(ema(y)[-1])
    return TrainingEnd(**ends)


@dataclass(frozen=True)
class Headline:
    label: str
    sentence: str
    degenerate: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _direction(row: dict[str, Any]) -> str:
    """rose / fell / did not measurably change: where the interval of the change lies."""
    iv = row["interval"]
    if iv["low"] > 0:
        return "rose"
    if iv["high"] < 0:
        return "fell"
    return "did not measurably change"


def _margin(s: dict[str, Any]) -> str:
    how = {BETTER: "grew in favour of the real clips", WORSE: "moved towards the negatives",
           SAME: "did not measurably move"}[s["verdict"]]
    return f"the preference margin {how} (s {change_cell(s, 2)})"


def _fit(real: dict[str, Any]) -> str:
    how = {BETTER: "the real clips are fit better", WORSE: "the real clips are fit worse",
           SAME: "the fit of the real clips did not measurably change"}[real["verdict"]]
    return f"{how} (their error {change_cell(real, 2)})"


def _samples(rows: Sequence[dict[str, Any]]) -> str:
    """The last clause: which sample metrics moved, if any were measured."""
    others = [r for r in rows if role_of(r) not in (MARGIN, COMPONENT)]
    if not others:
        return ""
    moved = {v: [r.get("short") or r["label"] for r in others if r["verdict"] == v] for v in (BETTER, WORSE)}
    if not moved[BETTER] and not moved[WORSE]:
        return "; the sample metrics did not measurably change"
    parts = [f"{', '.join(names)} got {v}" for v, names in moved.items() if names]
    return "; of the sample metrics, " + " and ".join(parts)


def decide(verdicts: Sequence[dict[str, Any]], train_rows: Sequence[dict[str, Any]] = ()) -> Headline:
    """One sentence of verdict from the evaluation's verdict rows and the training log."""
    by = {r["metric"]: r for r in verdicts}
    missing = [m for m in ("s", "denoise_error_real", "denoise_error_negative") if m not in by]
    if missing:
        raise ValueError(f"no verdict row for {', '.join(missing)}: the headline needs the margin and its components")
    s, real, neg = by["s"], by["denoise_error_real"], by["denoise_error_negative"]
    end = training_end(train_rows)
    m, w = s["verdict"], real["verdict"]

    if m == BETTER and w == WORSE:
        label, text = LABEL_WORSE_REAL, (
            f"Worse on the real clips: {_margin(s)} only because the error on the negatives rose faster than on "
            f"the real clips (real {change_cell(real, 2)}, negatives {change_cell(neg, 2)}), the degenerate path METHOD.md calls "
            "cheating")
    elif m == WORSE:
        label, text = LABEL_WORSE, f"Worse: {_margin(s)}, and {_fit(real)}"
    elif w == WORSE:
        label, text = LABEL_WORSE_REAL, f"Worse on the real clips: {_fit(real)}, and {_margin(s)}"
    elif m == BETTER:
        label, text = LABEL_BETTER, f"Better: {_margin(s)}, and {_fit(real)}"
    elif w == BETTER and _direction(neg) == "fell":
        label, text = LABEL_FIT_ONLY, (
            f"Both errors fell together (real {change_cell(real, 2)}, negatives {change_cell(neg, 2)}): the SFT term at work, "
            f"while {_margin(s)}")
    elif w == BETTER:
        label, text = LABEL_FIT_ONLY, f"The real clips are fit better (their error {change_cell(real, 2)}), but {_margin(s)}"
    else:
        label, text = LABEL_SAME, f"No measurable change: {_margin(s)}, and {_fit(real)}"

    degenerate = label == LABEL_WORSE_REAL and m == BETTER
    if end is not None and end.degenerate:
        degenerate = True
        if label in (LABEL_BETTER, LABEL_FIT_ONLY, LABEL_SAME):
            label = LABEL_DEGENERATE
            text = (f"Not better: training took the degenerate path (its win gap ended at {fmt_signed(end.win_gap, 2)} while "
                    f"s fell to {fmt_signed(end.s, 2)}), and on the held-out pairs {_margin(s)} and {_fit(real)}")
    return Headline(label, text + _samples(verdicts) + ".", degenerate)


def pairs_note(num_pairs: int) -> str:
    """Said under the verdict when the intervals rest on few pairs."""
    if num_pairs >= 10:
        return ""
    return (f"The intervals rest on {num_pairs} held-out pair{'s' if num_pairs != 1 else ''}: only a large change can "
            "be told from no change; hold out more clips (ingest.min_heldout) for sharper verdicts.")
