"""The evaluate stage on a tiny trained run: it compares two different models, builds only the
denoiser for its error pass, and writes the report, samples and metrics."""

import json
import os
import shutil

import pytest

from regdpo.config import load_config
from regdpo.data.shards import iter_pairs, shard_urls
from regdpo.eval.metrics import pair_errors
from regdpo.models import load_model
from regdpo.stages import run, runner
from regdpo.stages import evaluate as evaluate_stage
from tests.pipeline_helpers import small_config

FAST_SAMPLES = {"samples": {"num_inference_steps": 2, "guidance_scale": 1.0}}


def _train(tmp_path_factory, finetune):
    """ingest -> generate -> encode -> train -> evaluate on two real clips (one held out)."""
    root = tmp_path_factory.mktemp(f"eval-{finetune}")
    train = {"finetune": finetune, "max_steps": 3, **({"learning_rate": 1e-4} if finetune == "full" else {})}
    cfg = load_config(small_config(root, train=train, evaluate=FAST_SAMPLES))
    for stage in ("ingest", "generate", "encode", "train", "evaluate"):
        run(cfg, stage)
    return cfg


@pytest.fixture(scope="module")
def trained_lora(tmp_path_factory):
    return _train(tmp_path_factory, "lora")


@pytest.fixture(scope="module")
def trained_full(tmp_path_factory):
    return _train(tmp_path_factory, "full")


@pytest.fixture(params=["lora", "full"])
def trained(request):
    return request.getfixturevalue(f"trained_{request.param}")


def _rows(cfg):
    return [json.loads(ln) for ln in (cfg.workdir_path / "eval" / "pair_errors.jsonl").read_text().splitlines()]


def test_base_and_tuned_are_the_base_weights_and_the_trained_weights(trained):
    """Recompute both models' errors with independently built denoisers: a fresh base denoiser
    (no adapter at all) and a fresh tuned one from train/final. An evaluation that used the tuned
    weights for both (or the base for both) fails here."""
    cfg = trained
    spec = load_model(cfg.model)
    final = cfg.workdir_path / "train" / "final"
    base = spec.load_denoiser()
    if cfg.train.finetune == "lora":
        tuned = spec.load_denoiser()
        spec.load_lora(tuned, final)  # diffusers builds the adapter from the file's metadata
    else:
        tuned = type(base).from_pretrained(str(final / "transformer"), local_files_only=True).eval()
    independent = {"base": spec.bind(base), "tuned": spec.bind(tuned)}
    pairs = list(iter_pairs(shard_urls(cfg.workdir_path / "shards", "heldout")))
    expected = pair_errors(independent.__getitem__, pairs, cfg.evaluate.timesteps, cfg.evaluate.seed)
    got = _rows(cfg)
    assert len(got) == len(expected) == len(cfg.evaluate.timesteps)
    for g, e in zip(got, expected):
        for k in ("err_base_w", "err_base_l", "err_tuned_w", "err_tuned_l"):
            assert g[k] == pytest.approx(e[k], rel=1e-5), k
        assert g["err_base_w"] != g["err_tuned_w"]
    metrics = json.loads((cfg.workdir_path / "eval" / "metrics.json").read_text())
    assert metrics["identical_predictions"] is False


def test_report_metrics_and_samples_are_written(trained):
    ev = trained.workdir_path / "eval"
    for name in ("metrics.json", "report.md", "report.html", "training_curves.png", "denoise_error.png",
                 "samples.png", "samples.mp4", "pair_errors.jsonl"):
        assert (ev / name).is_file(), name
    assert len(list((ev / "samples").glob("*.mp4"))) == 2  # one held-out caption, base and tuned
    metrics = json.loads((ev / "metrics.json").read_text())
    assert {v["metric"] for v in metrics["verdicts"]} == {
        "denoise_error_real", "denoise_error_negative", "s", "implicit_acc", "frechet", "temporal_motion_gap",
        "temporal_flicker_gap"}
    assert all(v["interval"]["n"] == 1 for v in metrics["verdicts"])  # one held-out pair: no interval
    assert all(v["verdict"] == "no measurable change" for v in metrics["verdicts"])
    assert metrics["sample_metrics"]["feature_extractor"]["is_proxy"] is True
    report = (ev / "report.md").read_text()
    assert "tiny random-init preset" in report and "PROXY" in report
    record = json.loads((ev / "stage.json").read_text())
    assert set(record["summary"]["verdicts"]) == {v["metric"] for v in metrics["verdicts"]}


def test_error_pass_builds_only_the_denoiser(trained_lora, tmp_path, monkeypatch):
    """Without samples, evaluation never builds the VAE or a text encoder."""
    import diffusers
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("the error pass built a VAE or text encoder")

    trained = trained_lora
    cfg = trained.model_copy(update={"workdir": str(tmp_path / "w"), "evaluate": trained.evaluate.model_copy(
        update={"samples": trained.evaluate.samples.model_copy(update={"num_samples": 0})})})
    shutil.copytree(trained.workdir_path, cfg.workdir_path)
    monkeypatch.setattr(diffusers.AutoencoderKLWan, "__init__", refuse)
    monkeypatch.setattr(diffusers.AutoencoderKLWan, "from_pretrained", refuse)
    for cls in (transformers.BertModel, transformers.UMT5EncoderModel, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", refuse)
    result = runner.run_stage(cfg, "evaluate", evaluate_stage.build, force=True)
    assert result.summary["num_pairs"] == 1
    assert "No samples" in (cfg.workdir_path / "eval" / "report.md").read_text()


def test_a_user_scorer_appears_in_the_report(trained_lora, tmp_path):
    """evaluate.scorers with the user's own (video, caption) -> number from a local file: a verdict
    row in metrics.json and the report, per-sample numbers beside them. (One held-out caption here,
    so no interval; tests/test_world_experiment.py checks the intervals over several.)"""
    (tmp_path / "reward.py").write_text("def redness(video, caption):\n    return float(video[..., 0].mean())\n")
    trained = trained_lora
    scorer = {"kind": "callable", "path": str(tmp_path / "reward.py"), "function": "redness", "name": "red"}
    cfg = trained.model_copy(update={"workdir": str(tmp_path / "w"), "evaluate": trained.evaluate.model_validate(
        {**trained.evaluate.model_dump(), "scorers": [scorer]})})
    shutil.copytree(trained.workdir_path, cfg.workdir_path)
    runner.run_stage(cfg, "evaluate", evaluate_stage.build, force=True)
    ev = cfg.workdir_path / "eval"
    row = next(v for v in json.loads((ev / "metrics.json").read_text())["verdicts"] if v["metric"] == "scorer:red")
    assert row["interval"]["n"] == 1 and row["unit"] == "samples"  # one held-out caption sampled
    scores = [json.loads(ln) for ln in (ev / "sample_scores.jsonl").read_text().splitlines()]
    assert [r["video"] for r in scores] == ["real", "base", "tuned"] and all("red" in r for r in scores)
    report = (ev / "report.md").read_text()
    assert "sample score red" in report and "## Sample scores" in report
    # its line in the verdict table says why it has no interval
    line = next(ln for ln in report.splitlines() if ln.startswith("| sample score red"))
    assert "no interval" in line


def test_sample_settings_are_evaluations_own():
    """Changing evaluation's sampler redoes evaluation only, never the negatives."""
    from regdpo.config import config_from_dict
    from regdpo.stages.registry import STAGE

    raw = {"workdir": "/tmp/w", "model": {"preset": "tiny"}, "ingest": {"manifest": "/tmp/m.csv"}}
    a = config_from_dict(raw)
    b = config_from_dict({**raw, "evaluate": {"samples": {"num_inference_steps": 3, "guidance_scale": 1.0, "seed": 9}}})
    for name in ("generate", "encode", "train"):
        assert a.section_fingerprint(*STAGE[name].sections) == b.section_fingerprint(*STAGE[name].sections)
    assert a.section_fingerprint(*STAGE["evaluate"].sections) != b.section_fingerprint(*STAGE["evaluate"].sections)


def test_sample_seed_is_per_caption_and_not_the_negatives():
    import subprocess
    import sys

    from regdpo.stages.generate import clip_seed

    # the same in another process (no per-process salted hash()), so a rerun samples alike
    code = "from regdpo.stages.evaluate import sample_seed; print(sample_seed(0, 'abc'), sample_seed(5, 'abc'))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "random"}).stdout.split()
    assert [int(x) for x in other] == [evaluate_stage.sample_seed(0, "abc"), evaluate_stage.sample_seed(5, "abc")]
    seeds = {evaluate_stage.sample_seed(s, c) for s in (0, 5) for c in ("abc", "abd")}
    assert len(seeds) == 4 and all(0 <= x < 2**31 for x in seeds)  # per seed and caption; a 31-bit sampler seed
    assert evaluate_stage.sample_seed(0, "abc") != clip_seed(0, "abc")
