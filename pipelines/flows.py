"""Prefect flows over the regdpo stages: one flow per stage and the parent DAG.

This layer is thin on purpose: each flow loads the config, runs its stage through
`regdpo.stages.run` inside a task (so Prefect can retry it), and returns a small dict of
paths, fingerprints and counts. All the logic (fingerprints, skipping, atomic publication)
is in `regdpo.stages.runner`, which never imports prefect.

Run locally (Prefect's temporary server, or PREFECT_API_URL when set):
    regdpo run configs/demo.yaml [--stage train]
or from Python:
    from pipelines.flows import regdpo_pipeline
    regdpo_pipeline("configs/demo.yaml", stages=["train", "evaluate"])
Deployments (one per stage, the whole DAG, nightly schedules) are in prefect.yaml.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from regdpo import stages as stage_lib
from regdpo.config import Config, load_config
from regdpo.stages.runner import StageInputError

# Retry only where a second attempt can succeed: generation and encoding hit transient
# device and filesystem errors (CUDA OOM on a shared GPU, NFS hiccups). Ingest is cheap and
# deterministic; train resumes from its own checkpoints when the flow is rerun.
RETRIES: dict[str, int] = {"generate": 1, "encode": 1}
RETRY_DELAY_S: float = 30.0


def _run_name(stage: str):
    """flow_run_name callback: '<stage>-<config stem>' (plus '-force'), e.g. 'train-demo'."""

    def name() -> str:
        params = flow_run.parameters
        stem = Path(str(params.get("config_path", "config"))).stem
        return f"{stage}-{stem}" + ("-force" if params.get("force") else "")

    return name


def _pipeline_run_name() -> str:
    params = flow_run.parameters
    stem = Path(str(params.get("config_path", "config"))).stem
    requested = params.get("stages") or stage_lib.STAGES
    try:
        names = stage_lib.order(requested)
    except ValueError:  # the flow body reports it; the name must not fail first
        names = list(requested)
    return f"pipeline-{'+'.join(names)}-{stem}"


def _retry_transient(task_, task_run, state) -> bool:
    """Do not retry errors a second attempt cannot fix: missing inputs, bad config/values."""
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, (StageInputError, ValueError))


@task(name="run-stage", task_run_name="{name}", cache_policy=NO_CACHE)
def run_stage_task(cfg: Config, name: str, force: bool = False) -> dict[str, Any]:
    """Run one stage (skipped when current) and return its small result dict."""
    result = stage_lib.run(cfg, name, force=force)
    return {
        "stage": result.name,
        "path": str(result.path),
        "fingerprint": result.fingerprint,
        "skipped": result.skipped,
        "seconds": round(result.seconds, 3),
        "summary": result.summary,
    }


def _stage(name: str, config_path: str, force: bool, overrides: dict[str, Any] | None) -> dict[str, Any]:
    logger = get_run_logger()
    cfg = load_config(config_path, overrides)
    retries = RETRIES.get(name, 0)
    stage_task = run_stage_task.with_options(
        retries=retries, retry_delay_seconds=RETRY_DELAY_S, retry_condition_fn=_retry_transient
    )
    out = stage_task(cfg, name, force)
    if out["skipped"]:
        logger.info("%s: current (fingerprint %s), skipped: %s", name, out["fingerprint"], out["path"])
    else:
        logger.info("%s: done in %.1fs -> %s %s", name, out["seconds"], out["path"], out["summary"])
    return out


@flow(name="regdpo-ingest", flow_run_name=_run_name("ingest"))
def ingest_flow(config_path: str, force: bool = False, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Videos + captions -> normalised clips (<workdir>/ingest)."""
    return _stage("ingest", config_path, force, overrides)


@flow(name="regdpo-generate", flow_run_name=_run_name("generate"))
def generate_flow(config_path: str, force: bool = False, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Clips -> base-model negatives (<workdir>/negatives). GPU."""
    return _stage("generate", config_path, force, overrides)


@flow(name="regdpo-encode", flow_run_name=_run_name("encode"))
def encode_flow(config_path: str, force: bool = False, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Clips + negatives -> latent pair shards (<workdir>/shards). GPU."""
    return _stage("encode", config_path, force, overrides)


@flow(name="regdpo-train", flow_run_name=_run_name("train"))
def train_flow(config_path: str, force: bool = False, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Pair shards -> Reg-DPO checkpoint (<workdir>/train). GPU; resumes an interrupted run."""
    return _stage("train", config_path, force, overrides)


@flow(name="regdpo-evaluate", flow_run_name=_run_name("evaluate"))
def evaluate_flow(config_path: str, force: bool = False, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Checkpoint + held-out pairs -> metrics and report (<workdir>/eval)."""
    return _stage("evaluate", config_path, force, overrides)


STAGE_FLOWS = {
    "ingest": ingest_flow,
    "generate": generate_flow,
    "encode": encode_flow,
    "train": train_flow,
    "evaluate": evaluate_flow,
}
assert tuple(STAGE_FLOWS) == stage_lib.STAGES


@flow(name="regdpo-pipeline", flow_run_name=_pipeline_run_name)
def regdpo_pipeline(
    config_path: str,
    stages: list[str] | None = None,
    force: bool = False,
    overrides: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Run the requested stages (default: all) in pipeline order, each as a subflow.

    Stages not requested are read from disk as they are; a requested stage whose input stage is
    neither requested nor on disk fails before anything runs ("run ingest first").
    """
    cfg = load_config(config_path, overrides)
    names = stage_lib.order(stages)
    stage_lib.check_inputs(cfg, names)
    get_run_logger().info("stages: %s (workdir %s)", ", ".join(names), cfg.workdir)
    return [STAGE_FLOWS[name](config_path=config_path, force=force, overrides=overrides) for name in names]
