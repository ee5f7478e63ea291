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
    with pytest.raises(ConfigError, match=r"train.r_scale is 0 with r_mode: dgr, which is plain DPO"):
        config_from_dict({**BASE, "train": {"r_scale": 0}})
    assert config_from_dict({**BASE, "train": {"r_scale": 0, "objective": "dpo"}}).train.r_scale == 0
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


def _numeric_fields(model, prefix=""):
    """(dotted name, type, lower, upper) of every int/float field of the config models, recursively;
    a bound is (value, inclusive) or None. Read from the models' own constraints."""
    import typing

    import annotated_types as at
    from pydantic import BaseModel

    for name, info in model.model_fields.items():
        args = typing.get_args(info.annotation)
        nested = [a for a in (info.annotation, *args) if isinstance(a, type) and issubclass(a, BaseModel)]
        if nested:
            yield from _numeric_fields(nested[0], f"{prefix}{name}.")
            continue
        kinds = [a for a in (info.annotation, *args) if a in (int, float)]
        if not kinds or typing.get_origin(info.annotation) is list:  # lists: checked by their validators
            continue
        lower = upper = None
        for m in info.metadata:
            if isinstance(m, at.Ge):
                lower = (m.ge, True)
            elif isinstance(m, at.Gt):
                lower = (m.gt, False)
            elif isinstance(m, at.Le):
                upper = (m.le, True)
            elif isinstance(m, at.Lt):
                upper = (m.lt, False)
        yield f"{prefix}{name}", kinds[0], lower, upper


def _past(bound, kind, direction):
    value, inclusive = bound
    if kind is int:
        return value + direction if inclusive else value
    return value + direction * max(abs(value) * 1e-6, 1e-9) if inclusive else value


def test_every_numeric_field_has_a_range_and_rejects_values_past_it(tmp_path):
    """Generated from the config models: every int/float field has a lower bound, and a value just
    past any bound (below the lower, above the upper) fails naming the field."""
    from regdpo.config import Config

    fields = list(_numeric_fields(Config))
    names = {f[0] for f in fields}
    assert len(fields) >= 60 and {"train.learning_rate", "video.fps", "generate.guidance_scale", "seed"} <= names
    assert not [f[0] for f in fields if f[2] is None], "numeric fields without a lower bound"
    path = _write(tmp_path, BASE)
    checked = 0
    for dotted, kind, lower, upper in fields:
        for bound, direction in ((lower, -1), (upper, +1)):
            if bound is None:
                continue
            bad = _past(bound, kind, direction)
            with pytest.raises(ConfigError, match=rf"\n  {re.escape(dotted)}: .*(greater|less) than") as err:
                load_config(path, {dotted: bad})
            assert f"got {bad!r}" in str(err.value), (dotted, str(err.value))
            checked += 1
    assert checked >= 80


def test_the_ranges_the_issue_found_missing():
    """Values that were accepted and failed (or produced garbage) at run time."""
    for dotted, bad in (("train.learning_rate", 1e3), ("generate.guidance_scale", 1e38), ("video.fps", 1000.0),
                        ("generate.guidance_scale", 0.5), ("evaluate.samples.guidance_scale", 0.0),
                        ("train.seed", -1), ("ingest.num_workers", 0), ("train.timesteps.logit_mean", 1e9)):
        section, _, rest = dotted.partition(".")
        node: dict = {}
        cursor = node
        *parents, leaf = rest.split(".")
        for p in parents:
            cursor = cursor.setdefault(p, {})
        cursor[leaf] = bad
        raw = {**BASE, section: {**BASE.get(section, {}), **node}}
        with pytest.raises(ConfigError, match=re.escape(dotted)):
            config_from_dict(raw)


def test_an_unknown_key_suggests_the_nearest_valid_one():
    for typo, near in (("lerning_rate", "train.learning_rate"), ("max_step", "train.max_steps")):
        with pytest.raises(ConfigError, match=rf"train\.{typo}: unknown key; did you mean {near}\?"):
            config_from_dict({**BASE, "train": {typo: 1}})
    with pytest.raises(ConfigError, match=r"train\.lora\.rnak: unknown key; did you mean train\.lora\.rank\?"):
        config_from_dict({**BASE, "train": {"lora": {"rnak": 4}}})
    with pytest.raises(ConfigError, match=r"trian: unknown key; did you mean train\?"):
        config_from_dict({**BASE, "trian": {}})
    with pytest.raises(ConfigError, match=r"train\.colour: unknown key; remove it or check its spelling"):
        config_from_dict({**BASE, "train": {"colour": 1}})


def test_messages_carry_no_pydantic_prefix():
    for bad in ({"train": {"r_mode": "constant"}}, {"video": {"num_frames": 8, "height": 32, "width": 32}},
                {"model": {"preset": "tiny", "path": "/models/wan"}}):
        with pytest.raises(ConfigError) as err:
            config_from_dict({**BASE, **bad})
        assert "Value error" not in str(err.value) and "Assertion failed" not in str(err.value)
    with pytest.raises(ConfigError) as err:
        config_from_dict({**BASE, "train": {"r_mode": "constant"}})
    assert str(err.value).splitlines()[1] == ("  train.r_constant is 0 with r_mode: constant, which is plain DPO; "
                                              "set r_constant > 0 or objective: dpo")


def test_a_bad_config_names_its_missing_paths_too(tmp_path):
    """One run tells every up-front problem: the bad value, the missing manifest, the missing model."""
    raw = {**BASE, "model": {"path": "/no/such/model"}, "ingest": {"manifest": "nowhere.csv"}, "train": {"beta": -1}}
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, raw))
    lines = str(err.value).splitlines()
    assert lines[1].startswith("  train.beta: Input should be greater than 0")
    assert any(line.startswith(f"  ingest.manifest {tmp_path / 'nowhere.csv'} does not exist") for line in lines)
    assert any(line.startswith("  model.path /no/such/model does not exist") for line in lines)
