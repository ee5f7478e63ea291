"""Flow parameters a person fills in the Prefect UI: types, choices and descriptions.

The types come from the library (stage names from the registry, the train fields from
`TrainConfig`), so the form's enums and bounds never drift from what the config accepts.
Descriptions live in the flows' docstrings (`Args:`), where Prefect reads them for the form.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from regdpo.config import TrainConfig, load_config
from regdpo.stages.registry import STAGES


def _config_field(model, name: str) -> Any:
    """The annotation of `model.name` with its bounds (gt, ge...), for a flow parameter."""
    info = model.model_fields[name]
    return Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation


StageName = Literal[STAGES]  # type: ignore[valid-type]  # an enum in the UI form
MaxSteps = Optional[_config_field(TrainConfig, "max_steps")]
Beta = Optional[_config_field(TrainConfig, "beta")]
Objective = Optional[_config_field(TrainConfig, "objective")]

# Typed parameter -> the dotted config key it overrides.
TYPED_OVERRIDES: dict[str, str] = {
    "workdir": "workdir",
    "max_steps": "train.max_steps",
    "beta": "train.beta",
    "objective": "train.objective",
}

DOC_ARGS = {
    "config_path": "YAML config, relative to the project directory (e.g. configs/wan2.1-t2v-1.3b.yaml) or absolute.",
    "workdir": "Where the stages read and write (overrides the config's workdir; relative to the config file).",
    "max_steps": "Training steps (overrides train.max_steps).",
    "beta": "DPO beta for the mean-squared-error reduction (overrides train.beta; 1000 is the default).",
    "objective": "reg-dpo, dpo or sft (overrides train.objective).",
    "fan_out": ("local: work items on this machine's devices (one process per device); deployments: each work "
                "item as a run of the work-item deployment, shared by the workers of its pool over a shared workdir."),
    "overrides": 'Any other config values as dotted keys, e.g. {"generate.num_inference_steps": 30}.',
}


def merge_overrides(overrides: dict[str, Any] | None, **typed: Any) -> dict[str, Any] | None:
    """The typed parameters that are set, folded into the dotted `overrides` (typed ones win)."""
    merged = dict(overrides or {})
    for param, value in typed.items():
        if value is not None:
            merged[TYPED_OVERRIDES[param]] = value
    return merged or None


def short_path(path: str | Path, parts: int = 2) -> str:
    """The last `parts` components of a path: enough to tell workdirs apart in a run name."""
    return "/".join(Path(str(path)).parts[-parts:])


def workdir_label(params: dict[str, Any]) -> str:
    """The workdir a run will use, for its name; never fails (the flow body reports bad input)."""
    if params.get("workdir"):
        return short_path(params["workdir"])
    overrides = params.get("overrides") or {}
    try:
        cfg = load_config(params["config_path"], overrides or None)
    except Exception:  # noqa: BLE001 - a name must not fail the run before its body can explain
        return Path(str(params.get("config_path", "config"))).stem
    return short_path(cfg.workdir)
