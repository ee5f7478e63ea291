"""The report's one-sentence verdict (regdpo/eval/headline.py) on crafted metrics."""

import itertools
import re

import pytest

from regdpo.eval.contents import report_blocks
from regdpo.eval.headline import LABEL_BETTER, LABEL_DEGENERATE, LABEL_FIT_ONLY, LABEL_WORSE_REAL, decide
from regdpo.eval.metrics import summarize, verdict_row
from regdpo.eval.report import render_markdown
from regdpo.eval.stats import BETTER, SAME, WORSE, Interval
from tests.test_eval_fixtures import train_rows
from tests.test_eval_summary import rows_for


def _verdicts(real_change, neg_change, n=12, noise=0.01):
    return summarize(rows_for(n, real_change=real_change, neg_change=neg_change, noise=noise))["verdicts"]


def _cheating_train_rows(steps=60):
    """DPO's degenerate path in training: s keeps falling while the win gap climbs above 0."""
    return [{**r, "win_gap": 0.001 * r["step"], "lose_gap": 0.001 * r["step"] - r["s"]} for r in train_rows(steps)]


def _one_sentence(text: str) -> bool:
    return len(re.split(r"(?<=[.!?])\s+(?=[A-Z])", text.strip())) == 1 and text.rstrip().endswith(".")


def test_a_dpo_run_whose_win_gap_went_positive_headlines_as_worse_on_the_real_clips():
    # held out: both errors rose, the negatives' faster, so s fell: a "better" margin, a worse model
    rows = _verdicts(real_change=0.07, neg_change=0.09)
    by = {r["metric"]: r["verdict"] for r in rows}
    assert by["s"] == BETTER and by["implicit_acc"] == BETTER and by["denoise_error_real"] == WORSE
    head = decide(rows, _cheating_train_rows())
    assert head.label == LABEL_WORSE_REAL and head.degenerate
    assert head.sentence.startswith("Worse on the real clips") and "better" not in head.sentence.lower()
    assert "cheating" in head.sentence  # says which failure it is
    assert _one_sentence(head.sentence)


def test_degenerate_training_is_never_better_even_when_the_held_out_fit_cannot_tell():
    rows = _verdicts(real_change=0.0, neg_change=0.1)  # margin better, real-clip fit unchanged
    assert decide(rows).label == LABEL_BETTER
    head = decide(rows, _cheating_train_rows())
    assert head.label == LABEL_DEGENERATE and head.sentence.startswith("Not better: training took the degenerate path")


def test_both_errors_falling_together_is_the_sft_term_not_a_better_and_a_worse():
    """The demo's case: everything fits better, the margin does not move."""
    rows = summarize(rows_for(2, real_change=-0.4583, neg_change=-0.4576, noise=0.0005,
                              ts=(0.1, 0.3, 0.5, 0.7, 0.9)))["verdicts"]
    head = decide(rows, train_rows(60, drift=-1e-7))
    assert head.label == LABEL_FIT_ONLY
    assert head.sentence.startswith("Both errors fell together") and "did not measurably move" in head.sentence
    assert _one_sentence(head.sentence)


def test_a_clear_improvement_is_better():
    head = decide(_verdicts(real_change=-0.2, neg_change=0.1), train_rows(60))
    assert head.label == LABEL_BETTER and head.sentence.startswith("Better: the preference margin grew")


@pytest.mark.parametrize("m,w,lose,degenerate_training", itertools.product(
    (BETTER, WORSE, SAME), (BETTER, WORSE, SAME), (-1.0, 0.0, 1.0), (False, True)))
def test_no_combination_of_verdicts_calls_a_degenerate_run_better(m, w, lose, degenerate_training):
    def row(metric, verdict, better):
        sign = {BETTER: -1, WORSE: 1, SAME: 0}[verdict] * (1 if better == "lower" else -1)
        iv = Interval(0.1 * sign, 0.1 * sign - 0.05, 0.1 * sign + 0.05, 12, 0.95, "test")
        return verdict_row(metric, metric, 1.0, 1.0, iv, better=better, want=better,
                           role="margin" if metric == "s" else "component")

    rows = [row("s", m, "lower"), row("denoise_error_real", w, "lower")]
    neg_iv = Interval(0.1 * lose, 0.1 * lose - 0.05, 0.1 * lose + 0.05, 12, 0.95, "test")
    rows.append(verdict_row("denoise_error_negative", "neg", 1.0, 1.0, neg_iv, better="higher", want="higher",
                            role="component"))
    head = decide(rows, _cheating_train_rows() if degenerate_training else train_rows(60))
    if degenerate_training or (m == BETTER and w == WORSE):
        assert head.degenerate and head.label != LABEL_BETTER and not head.sentence.startswith("Better")
    assert _one_sentence(head.sentence)


def test_another_metric_with_an_interval_slots_into_the_sentence_and_the_table():
    rows = _verdicts(real_change=-0.2, neg_change=0.1)
    score = verdict_row("scorer_aesthetic", "aesthetic score of the samples", 5.0, 5.5,
                        Interval(0.5, 0.2, 0.8, 12, 0.95, "paired bootstrap"), better="higher", want="higher",
                        unit="clips", short="the aesthetic score")
    del score["role"]  # a row from code that knows nothing of roles still reads as a sample metric
    head = decide(rows + [score])
    assert head.sentence.endswith("of the sample metrics, the aesthetic score got better.")


def test_the_report_opens_with_the_one_sentence_verdict_and_components_are_not_votes():
    summary = summarize(rows_for(12, real_change=0.07, neg_change=0.09))
    md = render_markdown(report_blocks(summary=summary, config_yaml="", toy_note="a toy", beta=1000.0,
                                       train_rows=_cheating_train_rows(), unread_lines=0, plots={}, samples=[],
                                       sample_files={}))
    first = md.split("\n\n")[1]  # after the title
    assert first.startswith("Worse on the real clips") and _one_sentence(first)
    table = md[md.index("| metric |"):md.index("\n\n", md.index("| metric |"))].splitlines()[2:]
    assert [line.split(" | ")[0].lstrip("| ").split(":")[0] for line in table] == [
        "margin s = win gap - lose gap (want < 0)", "implicit accuracy", "↳ win gap", "↳ lose gap"]
    assert table[2].endswith("| rose: real clips fit worse |") and table[3].endswith("| rose |")


def test_a_report_whose_pairs_barely_differ_says_why_the_margin_cannot_move():
    summary = summarize(rows_for(2, real_change=-0.4583, neg_change=-0.4576, noise=0.0005))

    def render(distance):
        summary["latent_separation"] = {"mean_squared_distance": distance, "winner_variance": 0.15, "num_pairs": 2}
        return render_markdown(report_blocks(summary=summary, config_yaml="", toy_note=None, beta=1000.0,
                                             train_rows=train_rows(60), unread_lines=0, plots={}, samples=[],
                                             sample_files={}, experiment_doc="../../docs/EXPERIMENT.md"))

    md = render(1e-4)  # the demo's pairs: real clip and negative almost the same latent
    why = md[md.index("Why the preference term barely learns"):].split("\n\n")[0]
    assert "0.0001 apart in latent space" in why and "[docs/EXPERIMENT.md](../../docs/EXPERIMENT.md)" in why
    assert md.index(why) < md.index("## Verdict")
    assert "Why the preference term" not in render(0.2)  # pairs that differ: nothing to explain
