"""Pairs at scale on the real stages (tiny model, sample clips): incremental runs, kill -9 in
generate, two device processes, K negatives, batched sampling, shard compaction."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from regdpo.config import load_config
from regdpo.data.shards import iter_pairs, read_index, shard_urls
from regdpo.data.video import read_frames
from regdpo.stages import plan, run
from regdpo.stages.accounting import UnitsFailed
from regdpo.stages.units import Staging
from tests.fakes import hold_after, wait_for_sealed

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data" / "samples"


def _config(root: Path, rows: int, **sections) -> Path:
    """The sample clips' first `rows` manifest rows (copied beside the config), tiny model, 32x32."""
    data = root / "videos"
    data.mkdir(parents=True, exist_ok=True)
    manifest = pd.read_csv(SAMPLES / "manifest.csv")
    for name in manifest["path"]:
        if not (data / name).exists():
            shutil.copy(SAMPLES / name, data / name)
    manifest.head(rows).to_csv(data / "manifest.csv", index=False)
    cfg = {"workdir": "run", "model": {"preset": "tiny", "device": "cpu", "max_sequence_length": 16},
           "video": {"fps": 8, "num_frames": 9, "height": 32, "width": 32},
           "ingest": {"manifest": "videos/manifest.csv", "min_side": 32, "heldout_fraction": 0.2, "min_heldout": 2},
           "generate": {"num_inference_steps": 2, "guidance_scale": 1.0, "batch_size": 2, "work_item_size": 2},
           "encode": {"samples_per_shard": 3, "batch_size": 2}}
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def make_pairs(cfg) -> None:
    """ingest, generate and encode: the stages this file is about."""
    for name in ("ingest", "generate", "encode"):
        run(cfg, name)


def _mtimes(folder: Path, pattern: str) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.glob(pattern)}


def _pairs_in_shards(workdir: Path) -> list[str]:
    keys = []
    for split in ("train", "heldout"):
        for url in shard_urls(workdir / "shards", split):
            with tarfile.open(url) as tf:
                keys += sorted({m.split(".")[0] for m in tf.getnames()})
    return keys


def test_a_new_manifest_row_costs_one_negative_and_one_pair(tmp_path):
    path = _config(tmp_path, rows=9)
    cfg = load_config(path)
    workdir = Path(cfg.workdir)
    make_pairs(cfg)
    negatives, shards = _mtimes(workdir / "negatives", "*.mp4"), _mtimes(workdir / "shards", "*/*.tar")
    assert len(negatives) == 9 and sorted(_pairs_in_shards(workdir)) == sorted(Path(n).stem for n in negatives)

    _config(tmp_path, rows=10)  # the nightly manifest gained a row
    results = {name: run(cfg, name) for name in ("ingest", "generate", "encode")}
    assert [(r.summary["units_done"], r.summary["units_reused"]) for r in results.values()] == [(1, 9)] * 3
    after_neg, after_shards = _mtimes(workdir / "negatives", "*.mp4"), _mtimes(workdir / "shards", "*/*.tar")
    assert len(after_neg) == 10 and {k: after_neg[k] for k in negatives} == negatives  # untouched
    assert {k: after_shards[k] for k in shards} == shards and len(after_shards) == len(shards) + 1  # one new shard
    pairs = _pairs_in_shards(workdir)
    assert len(pairs) == len(set(pairs)) == 10  # every pair exactly once
    index = read_index(workdir / "shards")
    assert sum(s["num_samples"] for s in index["splits"].values()) == 10
    assert sorted(p for s in index["splits"].values() for sh in s["shards"] for p in sh["pairs"]) == sorted(pairs)
    assert all(run(cfg, n).skipped for n in ("ingest", "generate", "encode"))

    _config(tmp_path, rows=8)  # two rows removed: they drop out, their shards are compacted
    make_pairs(cfg)
    pairs = _pairs_in_shards(workdir)
    assert len(pairs) == len(set(pairs)) == 8 and len(_mtimes(workdir / "negatives", "*.mp4")) == 8
    table = pd.read_parquet(workdir / "negatives" / "negatives.parquet")
    assert sorted(table["negative_id"]) == sorted(pairs)


_GENERATE = "import sys; from regdpo.config import load_config; from regdpo.stages import run; run(load_config(sys.argv[1]), 'generate')"


def test_kill9_while_generating_keeps_finished_negatives(tmp_path):
    path = _config(tmp_path, rows=6, video={"height": 64, "width": 64},
                   generate={"num_inference_steps": 2, "batch_size": 1, "work_item_size": 1},
                   ingest={"min_side": 64})
    cfg = load_config(path)
    run(cfg, "ingest")
    staging = Staging(Path(cfg.workdir), "generate")
    proc = subprocess.Popen([sys.executable, "-c", hold_after(2) + _GENERATE, str(path)], cwd=ROOT)
    wait_for_sealed(staging, 2, proc)  # the child then holds its 3rd clip open: the kill lands mid-unit
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {json.loads(p.read_text())["id"]: p.parent for p in staging.root.glob("*/unit.json")}
    assert len(finished) == 2, len(finished)
    before = {cid: (d / f"{cid}.mp4").stat().st_mtime_ns for cid, d in finished.items()}
    counts = plan(cfg, "generate").counts  # what the rerun will do: only the clips not finished
    assert (counts["staged"], counts["pending"]) == (len(finished), 6 - len(finished))

    result = run(cfg, "generate")
    assert result.summary["units_done"] == 6 and result.summary["num_negatives"] == 6
    after = _mtimes(Path(cfg.workdir) / "negatives", "*.mp4")
    assert {cid: after[f"{cid}.mp4"] for cid in before} == before  # not regenerated
    table = pd.read_parquet(Path(cfg.workdir) / "negatives" / "negatives.parquet")
    assert table["clip_id"].is_unique and len(table) == 6 and len(after) == 6


def test_device_processes_reproduce_one_process_byte_for_byte(tmp_path):
    """Generate's contract, bytes half (regdpo/stages/generate.py): the same batch composition
    (batch_size 2, work_item_size 2: two work items of two clips) in this process and over two
    device processes gives the same negative files and the same pairs, bit for bit."""
    one = load_config(_config(tmp_path / "one", rows=4))
    two = load_config(_config(tmp_path / "two", rows=4, generate={"devices": ["cpu", "cpu"]}))
    for cfg in (one, two):
        make_pairs(cfg)
    neg_one, neg_two = (Path(c.workdir) / "negatives" for c in (one, two))
    names = sorted(p.name for p in neg_one.glob("*.mp4"))
    assert names == sorted(p.name for p in neg_two.glob("*.mp4")) and len(names) == 4
    for name in names:
        assert (neg_one / name).read_bytes() == (neg_two / name).read_bytes(), name
    columns = ["negative_id", "clip_id", "seed"]
    tables = [pd.read_parquet(d / "negatives.parquet")[columns].sort_values("negative_id").values.tolist()
              for d in (neg_one, neg_two)]
    assert tables[0] == tables[1]
    pairs = [{p["key"]: p for s in ("train", "heldout") for p in iter_pairs(shard_urls(Path(c.workdir) / "shards", s))}
             for c in (one, two)]
    assert sorted(pairs[0]) == sorted(pairs[1]) == sorted(Path(n).stem for n in names)
    for key, a in pairs[0].items():
        for name in ("latents_w", "latents_l", "prompt_embeds"):
            assert torch.equal(a[name], pairs[1][key][name]), (key, name)


# Generate's contract, rounding half: a negative's latents across batch compositions and thread
# counts on CPU in float32 (measured: at most 7.2e-7 at |latent| <= 5.1, also under load).
LATENT_TOLERANCE = 1e-5


def test_batch_composition_and_threads_move_a_negative_only_by_rounding():
    from regdpo.config import ModelConfig
    from regdpo.models import load_model
    from regdpo.stages.generate import clip_seed

    spec = load_model(ModelConfig(preset="tiny", device="cpu", max_sequence_length=16))
    denoiser = spec.load_denoiser()
    args = dict(num_frames=9, height=32, width=32, num_inference_steps=2, guidance_scale=3.0, negative_prompt="blurry")
    captions = pd.read_csv(SAMPLES / "manifest.csv")["caption"].tolist()[:3]
    seeds = [clip_seed(0, f"{i:016x}") for i in range(3)]
    videos, latents = spec.generate(denoiser, captions, seeds, return_latents=True, **args)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)  # another thread count too
        for i in range(3):  # each clip alone: another batch composition
            video, alone = spec.generate(denoiser, [captions[i]], [seeds[i]], return_latents=True, **args)
            assert (alone[0] - latents[i]).abs().max() <= LATENT_TOLERANCE, i
            assert np.abs(video[0].astype(int) - videos[i].astype(int)).max() <= 1, i  # before compression
    finally:
        torch.set_num_threads(threads)
    # what the tolerance must tell apart: another seed, another clip's caption
    _, wrong_seed = spec.generate(denoiser, [captions[0]], [seeds[0] + 1], return_latents=True, **args)
    _, wrong_clip = spec.generate(denoiser, [captions[1]], [seeds[0]], return_latents=True, **args)
    assert (wrong_seed[0] - latents[0]).abs().max() > 100 * LATENT_TOLERANCE
    assert (wrong_clip[0] - latents[0]).abs().max() > 100 * LATENT_TOLERANCE


def test_k_negatives_make_k_pairs_named_by_k(tmp_path):
    cfg = load_config(_config(tmp_path, rows=2, generate={"num_negatives": 2},
                              train={"max_steps": 1, "loader_workers": 0},
                              evaluate={"samples": {"num_samples": 4, "num_inference_steps": 1}}))
    make_pairs(cfg)
    table = pd.read_parquet(Path(cfg.workdir) / "negatives" / "negatives.parquet")
    assert len(table) == 4 and sorted(table["k"]) == [0, 0, 1, 1] and table["seed"].is_unique
    assert all(n == f"{c}_k{k}" for n, c, k in zip(table["negative_id"], table["clip_id"], table["k"]))
    assert (table["seconds"] > 0).all()
    assert sorted(_pairs_in_shards(Path(cfg.workdir))) == sorted(table["negative_id"])
    a, b = (read_frames(Path(cfg.workdir) / p) for p in table.sort_values(["clip_id", "k"])["path"][:2])
    assert not np.array_equal(a, b)  # two different samples of one clip
    # evaluate samples each held-out clip once (its K pairs share its caption and real clip)
    run(cfg, "train")
    heldout = set(pd.read_parquet(Path(cfg.workdir) / "ingest" / "clips.parquet").query("split == 'heldout'")["clip_id"])
    result = run(cfg, "evaluate")
    assert result.summary["num_pairs"] == 2 * len(heldout)
    samples = sorted(p.name for p in (Path(cfg.workdir) / "eval" / "samples").glob("*.mp4"))
    assert samples == sorted(f"{c}-{m}.mp4" for c in heldout for m in ("base", "tuned"))


def test_batched_sampling_matches_the_diffusers_pipeline_per_prompt():
    """Several clips per denoiser call with CFG batched in = WanPipeline, one prompt at a time."""
    from regdpo.config import ModelConfig
    from regdpo.models import load_model

    spec = load_model(ModelConfig(preset="tiny", device="cpu", max_sequence_length=16))
    denoiser = spec.load_denoiser()
    args = dict(num_frames=9, height=32, width=32, num_inference_steps=3, guidance_scale=3.0)
    prompts, seeds = ["a red ball rolls", "a dog in the snow", "a cat"], [11, 22, 33]
    _, latents = spec.generate(denoiser, prompts, seeds, negative_prompt="blurry", return_latents=True, **args)
    pipe = spec.pipeline(denoiser)
    negative = spec.encode_condition(["blurry"])["prompt_embeds"]
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        ref = pipe(prompt_embeds=spec.encode_condition([prompt])["prompt_embeds"], negative_prompt_embeds=negative,
                   generator=torch.Generator("cpu").manual_seed(seed), output_type="latent", **args).frames[0]
        torch.testing.assert_close(latents[i], ref, rtol=1e-4, atol=1e-5)


def test_unusable_generations_fail_their_unit(tmp_path, monkeypatch):
    from regdpo.stages import generate

    assert generate.check_video(np.zeros((9, 8, 8, 3), np.uint8), True).startswith("every frame is one constant")
    assert "non-finite" in generate.check_video(np.ones((9, 8, 8, 3), np.uint8), False)
    assert generate.check_video(np.arange(9 * 8 * 8 * 3, dtype=np.uint8).reshape(9, 8, 8, 3), True) is None
    cfg = load_config(_config(tmp_path, rows=2))
    # The config refuses such a guidance scale; bypass it to make the sampler overflow to inf
    # (whatever the cause, a non-finite generation must fail its unit, never be published).
    cfg = cfg.model_copy(update={"generate": cfg.generate.model_copy(update={"guidance_scale": 1e38})})
    run(cfg, "ingest")
    with pytest.raises(UnitsFailed, match=r"^2 of 2 units failed: 2 x the sampler produced non-finite"):
        run(cfg, "generate")  # every unit failed: nothing is published
    assert not list((Path(cfg.workdir) / "negatives").glob("*.mp4"))
    assert [f["id"] for f in Staging(Path(cfg.workdir), "generate").failures().values()] != []


def test_folder_of_videos_with_txt_captions_and_jsonl(tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    shutil.copy(SAMPLES / "cartoon_hills_pan.mp4", folder / "hills.mp4")
    (folder / "hills.txt").write_text("A cartoon landscape with rolling hills.\n")
    shutil.copy(SAMPLES / "snowy_traveler.mp4", folder / "nocaption.mp4")
    cfg = load_config(_config(tmp_path, rows=1, ingest={"manifest": str(folder)}))
    result = run(cfg, "ingest")
    clips = pd.read_parquet(Path(cfg.workdir) / "ingest" / "clips.parquet")
    rejects = pd.read_parquet(Path(cfg.workdir) / "ingest" / "rejects.parquet")
    assert clips["caption"].tolist() == ["A cartoon landscape with rolling hills."] and result.summary["num_clips"] == 1
    assert rejects[["row", "path", "reason"]].values.tolist() == [[2, "nocaption.mp4", "no caption: add nocaption.txt beside it"]]

    jsonl = tmp_path / "videos" / "m.jsonl"
    jsonl.write_text('{"path": "cartoon_hills_pan.mp4", "caption": "hills", "end_s": 2.0}\n')
    cfg = load_config(_config(tmp_path / "j", rows=1, ingest={"manifest": str(jsonl)}))
    assert run(cfg, "ingest").summary["num_clips"] == 1


def test_replaced_source_and_edited_shard_make_their_dependents_stale(tmp_path):
    from regdpo.stages.runner import expected_fingerprint

    path = _config(tmp_path, rows=3)
    cfg = load_config(path)
    workdir = Path(cfg.workdir)
    make_pairs(cfg)
    train_fp = expected_fingerprint(cfg, "train")[0]

    # the same file name, another video: a new clip (content hash), its negative, its pair
    manifest = pd.read_csv(tmp_path / "videos" / "manifest.csv")
    shutil.copy(SAMPLES / "airplane_field.mp4", tmp_path / "videos" / manifest["path"][0])
    done = {name: run(cfg, name).summary["units_done"] for name in ("ingest", "generate", "encode")}
    assert done == {"ingest": 1, "generate": 1, "encode": 1}
    assert expected_fingerprint(cfg, "train")[0] != train_fp

    # a shard edited after encode: its pairs are encoded again, and training on it is stale
    train_fp = expected_fingerprint(cfg, "train")[0]
    shard = Path(shard_urls(workdir / "shards", "train")[0])
    with open(shard, "ab") as f:
        f.write(b"\0" * 1024)
    assert expected_fingerprint(cfg, "train")[0] != train_fp
    counts = plan(cfg, "encode").counts
    assert counts["pending"] >= 1
    result = run(cfg, "encode")
    assert result.summary["units_done"] == counts["pending"]
    pairs = _pairs_in_shards(workdir)
    assert len(pairs) == len(set(pairs)) == 3 and not shard.exists()
