"""The reproduction experiment (experiments/): its claim checks, and its one command end to end
at a toy size (so it keeps working as the pipeline evolves)."""

from pathlib import Path

from experiments.analysis import claims, end
from regdpo.eval.compare import Run
from tests.test_eval_fixtures import train_rows


def _run(name, objective, rows, **train):
    return Run(name, Path("/nowhere"), {"objective": objective, **train}, rows, None)


def test_claims_follow_the_curves():
    collapsing = train_rows(200, drift=-2e-4)  # s -> -0.04: DGR -> ~0
    cheating = [{**r, "win_gap": 0.001 * r["step"]} for r in collapsing]
    runs = {"dpo": _run("dpo", "dpo", cheating),
            "reg-dpo": _run("reg-dpo", "reg-dpo", collapsing, r_mode="dgr", r_scale=1.0),
            "reg-dpo-r50": _run("reg-dpo-r50", "reg-dpo", [{**r, "r": 50.0, "win_gap": 0.01} for r in collapsing],
                                r_mode="constant", r_constant=50.0)}
    verdicts = {c: v for c, _, v in claims(runs, beta=1000.0)}
    assert verdicts["DPO: DGR collapses once s goes negative (β/2 at the start)"] == "holds"
    assert verdicts["DPO 'cheats': the win gap turns positive while s still falls"] == "holds"
    assert verdicts["r ≥ DGR turns the win gap negative and stops the lose gap's runaway"] == "holds"
    assert verdicts["The SFT term does not die with DGR (a constant r keeps the win gap negative)"] == "does not hold"

    flat = {"dpo": _run("dpo", "dpo", train_rows(200, drift=-1e-7))}
    verdicts = {c: v for c, _, v in claims(flat, beta=1000.0)}
    assert verdicts["DPO: DGR collapses once s goes negative (β/2 at the start)"] == "does not hold"
    assert end(flat["dpo"], "dgr") > 400


def test_the_command_runs_end_to_end_at_toy_size(tmp_path):
    from experiments.reproduce import main

    out = main(["--out", str(tmp_path / "runs"), "--docs", str(tmp_path / "docs"), "--steps", "2",
                "--warmup-steps", "2", "--variants", "dpo,reg-dpo", "--workers", "0",
                "--set", "video.height=32", "--set", "video.width=32", "--set", "ingest.max_clips_per_video=1",
                "--set", "generate.num_inference_steps=2", "--set", "evaluate.samples.num_samples=2",
                "--set", "evaluate.samples.num_inference_steps=2"])
    assert [v["name"] for v in out["variants"]] == ["dpo", "reg-dpo"]
    docs = tmp_path / "docs"
    for name in ("results.md", "results.json", "compare.md", "compare.csv", "compare.png", "r_sweep.png"):
        assert (docs / name).is_file(), name
    results = (docs / "results.md").read_text()
    assert "| dpo | dpo |" in results and "METHOD.md's claims" in results and "| total |" in results
    assert out["facts"]["calibration"]["latent_variance_after"] > 100 * out["facts"]["calibration"]["latent_variance_before"]
    for variant in ("dpo", "reg-dpo"):
        assert (tmp_path / "runs" / "variants" / variant / "eval" / "report.html").is_file()
