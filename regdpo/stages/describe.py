"""What the command line says about stages, in words: a stage's summary on one line, what changed
since a stage last ran, where an interrupted run resumes, and what ingest rejected.

    summary_line({"final_loss": 410.3778, "resumed_from": None})  -> "final_loss=410.4"
    changes(cfg, "train")        -> ["train.beta 500 -> 1000", "inputs: shards changed"]
    resume_point(cfg, "train")   -> "an interrupted run resumes from its checkpoint at step 100 (120 of 200 ...)"
    reject_lines(workdir)        -> ["row 5  missing.mp4: file not found", ...]

Reads files only (no torch, no prefect), like `regdpo status`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from regdpo.config import Config, fingerprint_payload
from regdpo.stages.registry import STAGE, get_stage
from regdpo.stages.runner import expected_fingerprint, input_identities, read_stage_record, stage_dir

MAX_REJECT_LINES = 10  # rejects listed on the terminal; all of them are in ingest/rejects.parquet


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return json.dumps(text) if ", " in text else text


def summary_line(summary: dict[str, Any]) -> str:
    """A stage's summary as `key=value, ...`: numbers to 4 significant digits, nothing for a value
    that is unset (None, False); a nested table (the evaluation's verdicts) is left to stage.json
    and the report, except a list of failed units, whose first reason is shown."""
    parts = []
    for key, value in summary.items():
        if value is None or value is False:
            continue
        if key == "failed" and isinstance(value, list) and value:
            first = value[0]
            more = f" (+{len(value) - 1} more in stage.json)" if len(value) > 1 else ""
            parts.append(f"first failure: {first.get('id')}: {first.get('reason')}{more}")
        elif not isinstance(value, (dict, list)):
            parts.append(f"{key}={_value(value)}")
    return ", ".join(parts)


def _flat(payload: Any, prefix: str) -> dict[str, Any]:
    if isinstance(payload, dict):
        out: dict[str, Any] = {}
        for key, value in payload.items():
            out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: payload}


def _settings(raw: dict[str, Any] | Config, sections: tuple[str, ...]) -> dict[str, Any]:
    """The settings that shape a stage's output (runtime fields left out), flattened to dotted keys."""
    cfg = raw if isinstance(raw, Config) else Config.model_validate(raw)
    return _flat({"seed": cfg.seed, **{s: fingerprint_payload(getattr(cfg, s)) for s in sections}}, "")


_UNSET = object()


def _show(value: Any) -> str:
    if value is _UNSET:
        return "(unset)"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):
        return value if value and " " not in value else json.dumps(value)
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def setting_changes(cfg: Config, name: str) -> list[str]:
    """'train.beta 500.0 -> 1000.0' for every setting that shapes stage `name` and differs from
    the config its published output was made with (none when it was never published)."""
    path = stage_dir(cfg.workdir, name) / "config.yaml"
    if not path.is_file():
        return []
    sections = get_stage(name).sections
    try:
        old = _settings(yaml.safe_load(path.read_text()), sections)
    except (ValueError, TypeError, yaml.YAMLError):  # written by an older version: cannot be compared
        return [f"settings (its {path.name} predates this version)"]
    new = _settings(cfg, sections)
    return [f"{key} {_show(old.get(key, _UNSET))} -> {_show(new.get(key, _UNSET))}"
            for key in sorted(set(old) | set(new)) if old.get(key, _UNSET) != new.get(key, _UNSET)]


def input_changes(cfg: Config, name: str) -> list[str]:
    """'shards changed', 'model files changed', ...: the inputs of stage `name` that are not what
    its published output was made from."""
    rec = read_stage_record(cfg.workdir, name) or {}
    out = []
    for up in get_stage(name).inputs:
        current = read_stage_record(cfg.workdir, up)
        if current is None:
            out.append(f"{STAGE[up].dir} missing")
        elif rec.get("upstream", {}).get(up) != current["fingerprint"]:
            out.append(f"{STAGE[up].dir} changed")
    recorded = rec.get("inputs")
    if recorded is not None:
        now = input_identities(cfg, name)
        what = {"model": "model files", "shards": "shard files (edited or replaced since)"}
        out += [f"{what[k]} changed" for k in what if recorded.get(k) != now.get(k)]
    return out


def changes(cfg: Config, name: str) -> list[str]:
    """What changed since stage `name` last ran: its settings, then its inputs ('inputs: ...')."""
    inputs = input_changes(cfg, name)
    return setting_changes(cfg, name) + ([f"inputs: {', '.join(inputs)}"] if inputs else [])


def resume_point(cfg: Config, name: str) -> str | None:
    """Where an interrupted run of a resumable stage stands and whether the next run resumes it
    (None when there is no interrupted run)."""
    stage = get_stage(name)
    partial = Path(cfg.workdir) / f".{stage.dir}.partial"
    if not stage.resumable or not partial.is_dir():
        return None
    from regdpo.train.checkpoint import TrainState, list_checkpoints  # torch: only when there is one

    checkpoints = list_checkpoints(partial / "checkpoints")
    logged = _logged_steps(partial / "metrics.jsonl")
    of = f" of {cfg.train.max_steps}" if name == "train" else ""
    if not checkpoints:
        return f"an interrupted run logged {logged} steps{of} but saved no checkpoint yet: the next run starts over"
    step = TrainState.read(checkpoints[-1]).step
    try:
        marker = json.loads((partial / "partial.json").read_text()).get("fingerprint")
        same = marker == expected_fingerprint(cfg, name)[0]
    except (OSError, ValueError):
        same = False
    where = f"its checkpoint at step {step}{of} ({logged} steps logged)"
    if same:
        return f"an interrupted run resumes from {where}"
    return (f"an interrupted run with other settings has {where}: the next run continues it if the change keeps its "
            "trajectory (e.g. more steps), else starts over")


def _logged_steps(metrics: Path) -> int:
    from regdpo.train.observe import read_jsonl

    return len(read_jsonl(metrics, skip_bad=True, warn=False))


def reject_lines(workdir: str | Path, limit: int = MAX_REJECT_LINES) -> tuple[list[str], int]:
    """The first `limit` rows of ingest/rejects.parquet as 'row 5  missing.mp4: file not found',
    and how many there are in all."""
    import pandas as pd

    path = stage_dir(workdir, "ingest") / "rejects.parquet"
    if not path.is_file():
        return [], 0
    frame = pd.read_parquet(path)
    lines = [f"row {r['row']}  {r['path'] or '(no path)'}: {r['reason']}" for r in frame.head(limit).to_dict("records")]
    return lines, len(frame)
