"""Strict config: unknown keys and bad values fail naming the field."""

from pathlib import Path

import re

import pytest
import yaml

from regdpo.config import ConfigError, config_from_dict, load_config, save_resolved

BASE = {
    "workdir": "run",
    "model": {"preset": "tiny", "max_sequence_length": 16},
    "video": {"fps": 8, "num_frames": 9, "height": 32, "width": 32},
    "ingest": {"manifest": "manifest.csv"},
}


def _write(tmp_path, cfg):
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_loads_and_resolves_paths_against_the_config_file(tmp_path):
    cfg = load_config(_write(tmp_path, BASE))
    assert cfg.workdir == str(tmp_path / "run")
    assert cfg.ingest.manifest == str(tmp_path / "manifest.csv")
    assert cfg.train.beta == 1000.0 and cfg.train.objective == "reg-dpo" and cfg.train.r_mode == "dgr"


def test_unknown_key_names_the_field(tmp_path):
    bad = {**BASE, "train": {"betta": 5}}
    with pytest.raises(ConfigError, match=r"train\.betta: unknown key"):
        load_config(_write(tmp_path, bad))


def test_wrong_type_names_the_field(tmp_path):
    bad = {**BASE, "train": {"max_steps": "many"}}
    with pytest.raises(ConfigError, match=r"train\.max_steps"):
        load_config(_write(tmp_path, bad))


def test_cross_field_rules(tmp_path):
    with pytest.raises(ConfigError, match=r"num_frames must be 4k\+1"):
        config_from_dict({**BASE, "video": {"num_frames": 8, "height": 32, "width": 32}})
    with pytest.raises(ConfigError, match="exactly one of model.preset"):
        config_from_dict({**BASE, "model": {"preset": "tiny", "path": "/models/wan"}})
    with pytest.raises(ConfigError, match="r_constant"):
        config_from_dict({**BASE, "train": {"r_mode": "constant"}})
    with pytest.raises(ConfigError, match=r"ingest.*required"):
        config_from_dict({k: v for k, v in BASE.items() if k != "ingest"})


def test_overrides_and_resolved_dump(tmp_path):
    cfg = load_config(_write(tmp_path, BASE), overrides={"train.max_steps": 3})
    assert cfg.train.max_steps == 3
    out = save_resolved(cfg, tmp_path / "out")
    again = yaml.safe_load(out.read_text())
    assert again["train"]["max_steps"] == 3 and again["train"]["beta"] == 1000.0
    assert config_from_dict(again) == cfg


def test_section_fingerprint_tracks_only_its_sections():
    a = config_from_dict(BASE)
    b = config_from_dict({**BASE, "train": {"max_steps": 7}})
    assert a.section_fingerprint("video", "ingest") == b.section_fingerprint("video", "ingest")
    assert a.section_fingerprint("train") != b.section_fingerprint("train")


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")))
def test_shipped_configs_are_valid(path):
    cfg = load_config(path)
    assert cfg.train.objective == "reg-dpo" and cfg.train.beta == 1000.0


def test_runtime_fields_are_in_no_fingerprint(tmp_path):
    """Where and how fast work runs (device, batch sizes, checkpoint cadence) never redoes work."""
    cfg = load_config(_write(tmp_path, BASE))
    placed = load_config(_write(tmp_path, {**BASE, "model": {**BASE["model"], "device": "cuda:3"},
                                           "generate": {"batch_size": 7}, "encode": {"samples_per_shard": 3},
                                           "train": {"checkpoint_every": 9, "gradient_checkpointing": True}}))
    for sections in (("model",), ("generate",), ("encode",), ("train",)):
        assert placed.section_fingerprint(*sections) == cfg.section_fingerprint(*sections), sections
    shaped = load_config(_write(tmp_path, {**BASE, "generate": {"guidance_scale": 2.0}}))
    assert shaped.section_fingerprint("generate") != cfg.section_fingerprint("generate")


def _float_fields(model, prefix=""):
    """Every float-valued field of the config models, recursively, as dotted names."""
    import typing

    from pydantic import BaseModel

    for name, info in model.model_fields.items():
        ann = info.annotation
        args = typing.get_args(ann)
        nested = [a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)]
        if nested:
            yield from _float_fields(nested[0], f"{prefix}{name}.")
        elif ann is float or float in args or any(float in typing.get_args(a) for a in args):
            yield f"{prefix}{name}", ann


def test_every_float_field_rejects_inf_and_nan_naming_it(tmp_path):
    """Generated from the config models: a new float field is covered without editing this test."""
    from regdpo.config import Config

    fields = list(_float_fields(Config))
    assert len(fields) >= 15 and "train.beta" in dict(fields) and "evaluate.timesteps" in dict(fields)
    for dotted, ann in fields:
        for bad in (float("inf"), float("-inf"), float("nan")):
            value = [bad] if "list" in str(ann) else bad
            with pytest.raises(ConfigError, match=rf"{re.escape(dotted)}\b.*finite") as err:
                load_config(_write(tmp_path, BASE), {dotted: value})
            assert dotted in str(err.value)
