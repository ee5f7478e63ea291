"""The world experiment's one command end to end at toy size: world clips, a base model trained a
few steps (a diffusers Wan directory the pipeline loads through model.path, cached), the
pipeline's stages, variants scored by the world's score and a user's own scorer, the table."""

from __future__ import annotations

import json

import pytest

from experiments.world.base_model import BaseSettings, build_base

REWARD = "def redness(video, caption):\n    return float(video[..., 0].mean()) / 255.0\n"


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    from experiments.world.run import main

    root = tmp_path_factory.mktemp("world-experiment")
    (root / "reward.py").write_text(REWARD)
    scorers = f"[{{kind: world}}, {{kind: callable, path: {root / 'reward.py'}, function: redness}}]"
    out = main(["--out", str(root / "runs"), "--cache", str(root / "cache"), "--docs", str(root / "docs"),
                "--quick-base", "--base-clips", "8", "--tune-clips", "12", "--steps", "2", "--workers", "0",
                "--variants", "dpo,reg-dpo", "--set", "ingest.min_heldout=4", "--set", "evaluate.samples.num_samples=4",
                "--set", "generate.num_inference_steps=2", "--set", "evaluate.samples.num_inference_steps=2",
                "--set", f"evaluate.scorers={scorers}"])
    return root, out


def test_results_table_and_figures(experiment):
    root, out = experiment
    assert [v["name"] for v in out["variants"]] == ["dpo", "reg-dpo"]
    docs = root / "docs"
    for name in ("results.md", "results.json", "compare.md", "compare.png", "r_sweep.png", "world_score.png"):
        assert (docs / name).is_file(), name
    results = (docs / "results.md").read_text()
    for row in ("| real clips |", "| real clips through the VAE |", "| base |", "| dpo | dpo |",
                "| reg-dpo | reg-dpo, r = DGR |"):
        assert row in results, row
    assert "METHOD.md's claims" in results and "| total |" in results and "Load average" in results
    record = json.loads((docs / "results.json").read_text())
    assert record["world_score"]["reg-dpo"]["change"]["n"] == 4
    assert record["total_cpu_seconds"] > 0 and record["facts"]["base_model"]["cached"] is False


def test_user_scorer_is_in_each_report_with_an_interval(experiment):
    root, _ = experiment
    for variant in ("dpo", "reg-dpo"):
        ev = root / "runs" / "variants" / variant / "eval"
        row = next(v for v in json.loads((ev / "metrics.json").read_text())["verdicts"]
                   if v["metric"] == "scorer:redness")
        interval = row["interval"]
        assert interval["n"] == 4 and interval["low"] <= row["change"] <= interval["high"]
        assert interval["high"] - interval["low"] < float("inf")
        line = next(ln for ln in (ev / "report.md").read_text().splitlines() if "sample score redness" in ln)
        assert "[" in line and "none" not in line


def test_base_model_is_a_cached_wan_directory(experiment):
    from regdpo.config import ModelConfig
    from regdpo.models import load_model

    root, out = experiment
    base_dir = root / "cache" / next(p.name for p in (root / "cache").iterdir() if p.name.startswith("base-"))
    index = json.loads((base_dir / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline" and index["vae"][1] == "AutoencoderKLWan"
    manifest = next((root / "cache").glob("world-s0-*/manifest.csv"))
    again, facts = build_base(manifest, root / "cache", BaseSettings(max_sequence_length=48).quick())
    assert again == base_dir and facts["cached"] is True
    spec = load_model(ModelConfig(path=str(base_dir), device="cpu", max_sequence_length=48))
    video = spec.generate(spec.load_denoiser(), ["one shape. a red circle moves up slowly."], [0], num_frames=9,
                          height=32, width=32, num_inference_steps=2, guidance_scale=1.0)
    assert video.shape == (1, 9, 32, 32, 3)


def test_base_settings_from_the_command_line():
    import argparse

    from experiments.world.run import base_settings

    parser = argparse.ArgumentParser()
    s = base_settings(BaseSettings(), ["steps=800", "vae_lr=0.002", "vae_image_steps=500"], parser)
    assert (s.steps, s.vae_lr, s.vae_image_steps) == (800, 0.002, 500) and isinstance(s.vae_lr, float)
    assert s.batch_size == BaseSettings().batch_size
    for bad in ("no_such_setting=1", "steps"):
        with pytest.raises(SystemExit):
            base_settings(BaseSettings(), [bad], parser)
