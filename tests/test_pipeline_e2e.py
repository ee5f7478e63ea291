"""The whole GT-Pair Reg-DPO DAG under Prefect, with real stages, on two short real clips."""

import json
import math

import pytest
import torch
import webdataset as wds
from safetensors.torch import load as st_load

from regdpo.stages.runner import STAGES, stage_dir
from tests.pipeline_helpers import small_config

LAYOUT = [
    "ingest/clips.parquet", "ingest/rejects.parquet", "negatives/negatives.parquet", "shards/index.json",
    "train/metrics.jsonl", "train/final/pytorch_lora_weights.safetensors", "eval/metrics.json", "eval/report.md",
    "eval/training_curves.png", "eval/denoise_error.png", "eval/samples.png",
]


@pytest.mark.prefect
def test_whole_dag_then_rerun_one_stage(prefect_harness, tmp_path):
    from pipelines.flows import regdpo_pipeline

    config = small_config(tmp_path)
    results = regdpo_pipeline(str(config))
    assert [r["stage"] for r in results] == list(STAGES)
    assert not any(r["skipped"] for r in results)

    work = tmp_path / "run"
    for rel in LAYOUT:
        assert (work / rel).is_file(), rel
    import pandas as pd

    clips = pd.read_parquet(work / "ingest" / "clips.parquet")
    assert len(clips) == 2 and set(clips.split) == {"train", "heldout"}
    for cid in clips.clip_id:
        assert (work / "ingest" / "clips" / f"{cid}.mp4").is_file()
        assert (work / "negatives" / f"{cid}.mp4").is_file()
    assert list((work / "eval" / "samples").glob("*-tuned.mp4"))

    # shards read with plain webdataset + safetensors
    index = json.loads((work / "shards" / "index.json").read_text())
    urls = [str(work / "shards" / s["path"]) for split in index["splits"].values() for s in split["shards"]]
    keys = []
    for sample in wds.WebDataset(urls, shardshuffle=False):
        pair = st_load(sample["pair.safetensors"])
        assert pair["latents_w"].shape == pair["latents_l"].shape == (16, 3, 4, 4)
        assert pair["prompt_embeds"].shape[-1] == 384
        assert not torch.equal(pair["latents_w"], pair["latents_l"])
        keys.append(sample["__key__"])
    assert sorted(keys) == sorted(clips.clip_id)

    rows = [json.loads(ln) for ln in (work / "train" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-4)
    report = (work / "eval" / "report.md").read_text()
    assert "implicit accuracy" in report and "training_curves.png" in report

    # rerun only evaluate: every other stage's files keep their mtimes
    before = {p: p.stat().st_mtime_ns for s in STAGES if s != "evaluate"
              for p in stage_dir(work, s).rglob("*") if p.is_file()}
    eval_before = (work / "eval" / "stage.json").stat().st_mtime_ns
    again = regdpo_pipeline(str(config), stages=["evaluate"], force=True)
    assert [r["stage"] for r in again] == ["evaluate"] and not again[0]["skipped"]
    after = {p: p.stat().st_mtime_ns for p in before}
    assert after == before
    assert (work / "eval" / "stage.json").stat().st_mtime_ns != eval_before

    # and the whole DAG again is a no-op
    assert all(r["skipped"] for r in regdpo_pipeline(str(config)))
