"""The report (markdown + self-contained HTML), its plots and the side-by-side samples."""

import json
import re

import numpy as np
import pytest

from regdpo.data.video import read_frames
from regdpo.eval.contents import report_blocks, training_observations
from regdpo.eval.plots import ema, load_metrics, plot_denoise_error, plot_training_curves
from regdpo.eval.report import TINY_WARNING, render_markdown, toy_warning, write_report
from regdpo.eval.samples import FONT_PX, GAP, MIN_CELL, _fit, _font, write_contact_sheet, write_sample_grid
from tests.test_eval_fixtures import sample_sets, summary_with_samples, train_rows


def _blocks(toy_note=TINY_WARNING, with_files=True):
    summary, sets = summary_with_samples(2)
    names = {"training": "training_curves.png", "denoise": "denoise_error.png", "samples": "samples.png"}
    return report_blocks(
        summary=summary, config_yaml="model:\n  preset: tiny\n", toy_note=toy_note, beta=1000.0, train_rows=train_rows(80),
        unread_lines=0, plots=names if with_files else {},
        samples=[{"clip_id": s.clip_id, "caption": s.caption, "seed": s.seed, "tuned_vs_base": s.tuned_vs_base()}
                 for s in sets], sample_files={"grid": "samples.mp4"} if with_files else {}), summary, sets


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    blocks, summary, sets = _blocks()
    plot_training_curves(train_rows(80), out / "training_curves.png")
    plot_denoise_error(summary, out / "denoise_error.png")
    write_contact_sheet(sets, out / "samples.png")
    write_sample_grid(sets, out / "samples.mp4", 8)
    return write_report(out, blocks)


def test_report_puts_the_verdict_first_and_says_when_the_model_is_a_toy(report):
    md_path, html_path = report
    md = md_path.read_text()
    assert TINY_WARNING in md
    assert md.index(TINY_WARNING) < md.index("## Verdict") < md.index("## Training") < md.index("## Samples") < \
        md.index("## Configuration")
    table = md[md.index("| metric |"):md.index("\n\n", md.index("| metric |"))]
    assert len(table.splitlines()) == 2 + 7  # header, rule, 4 error metrics, Fréchet, 2 temporal
    assert len(table.splitlines()[0].split(" | ")) == 5  # narrow: metric, base, tuned, change, verdict
    assert "over 2 pairs or 2 clips" in md and "PROXY" in table
    for verdict in re.findall(r"\*\*(.+?)\*\*", table):
        assert verdict in ("better", "worse", "no measurable change")
    assert "FVD" not in md.replace("not FID/FVD", "").replace("FID or FVD", "")


def test_a_real_model_report_has_no_toy_warning():
    assert TINY_WARNING not in render_markdown(_blocks(toy_note=None, with_files=False)[0])


def test_toy_models_are_named_as_such_whatever_their_origin():
    assert toy_warning("tiny", 10**9) == TINY_WARNING
    assert "0.05M parameters" in toy_warning(None, 50_000)  # a tiny model saved as a model directory
    assert toy_warning(None, 1_300_000_000) is None


def test_html_is_self_contained(report):
    _, html_path = report
    page = html_path.read_text()
    sources = re.findall(r"src='([^']*)'", page)
    assert len(sources) == 4  # three PNGs and the grid video
    assert all(s.startswith(("data:image/png;base64,", "data:video/mp4;base64,")) for s in sources)
    assert "href=" not in page and "<link" not in page and "http" not in page
    assert "class='better'" in page or "class='same'" in page


def test_training_curves_are_drawn_from_a_tolerant_read(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = train_rows(30)
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 30, "loss": 1.'  # cut short mid-write
    path.write_text(text.replace('"lr": 0.001', '"lr": "n/a"', 1) + "\n\n[1, 2]\n")
    read, bad = load_metrics(path)
    assert len(read) == 30 and bad == 2
    assert "lr" not in read[0] and read[1]["lr"] == 0.001
    out = plot_training_curves([{k: v for k, v in r.items() if k != "grad_norm"} for r in read], tmp_path / "c.png")
    assert out.stat().st_size > 10_000


def test_ema_is_bias_corrected():
    x = np.array([5.0, 5.0, 5.0, 5.0])
    np.testing.assert_allclose(ema(x, span=10), x)  # no pull toward 0 at the start
    assert ema(np.arange(100.0))[-1] < 99


def test_observations_name_the_failure_modes():
    collapsed = training_observations(train_rows(200, drift=-2e-4), beta=1000.0)
    assert any("DGR collapsed" in n for n in collapsed)
    assert any("r equals DGR" in n for n in collapsed)
    flat = training_observations(train_rows(200, drift=-1e-7), beta=1000.0)
    assert any("ln 2" in n for n in flat) and not any("collapsed" in n for n in flat)
    assert any("moved together" in n for n in flat)
    cheating = [{**r, "win_gap": 0.01 * r["step"]} for r in train_rows(50)]
    assert any("cheating" in n for n in training_observations(cheating, beta=1000.0))


def test_sample_grid_and_contact_sheet(tmp_path):
    sets = sample_sets(2, frames=5, size=16)
    sets[0].caption = "a very long caption " * 20  # must be cut to its row, not run across the video
    grid = read_frames(write_sample_grid(sets, tmp_path / "grid.mp4", 8))
    assert grid.shape[0] == 5 and grid.shape[1] % 2 == 0 and grid.shape[2] % 2 == 0
    assert grid.shape[1] >= 2 * MIN_CELL and grid.shape[2] >= 3 * MIN_CELL  # 16-px clips enlarged for display
    # no label crosses into a neighbouring column: the header band is dark in the gaps between columns
    band = FONT_PX + 12
    for c in (1, 2):
        gap = grid[0, :band, c * MIN_CELL + (c - 1) * GAP:c * (MIN_CELL + GAP)]
        assert gap.max() < 80, f"text in the gap before column {c}"
    font = _font(FONT_PX)
    assert font.getlength(_fit(sets[0].caption, font, 300)) <= 300
    assert write_contact_sheet(sets, tmp_path / "sheet.png").stat().st_size > 5_000
    assert sets[0].tuned_vs_base() == pytest.approx(5.0)
    with pytest.raises(ValueError, match="one shape"):
        bad = sample_sets(1)[0]
        bad.videos["tuned"] = bad.videos["tuned"][:, :8]
        write_sample_grid([bad], tmp_path / "bad.mp4", 8)
