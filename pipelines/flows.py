"""Prefect flows over the regdpo stages: one flow per stage (made from the stage registry) and the DAG.

This layer is thin on purpose: a flow loads the config, checks what can be checked up front,
runs its stage through `regdpo.stages.run` inside a task (retried on transient errors only),
shows the outputs as artifacts, and returns a small dict of paths, fingerprints and counts.
Fingerprints, skipping and atomic publication are the library's (it never imports prefect).

Failures: only a transient error (regdpo/errors.py: CUDA out of memory, a network filesystem
hiccup, a lost API connection) is retried, once. A user error (bad config, missing input, a
manifest with nothing usable) is reported as one line (`<stage> failed: <reason>`) with no
traceback; any other error (a model that cannot load, a bug) fails at once and logs one
traceback, from its task. The flows return a
Failed state carrying the exception instead of re-raising it, so neither the stage flow nor
the parent adds a traceback of its own; a direct call still raises the original exception.

Run locally (Prefect's temporary server, or PREFECT_API_URL when set):
    regdpo run configs/demo.yaml [--stage train]
or from Python:
    from pipelines.flows import regdpo_pipeline
    regdpo_pipeline("configs/demo.yaml", stages=["train", "evaluate"], max_steps=50)
Deployments (the whole DAG, each stage, the nightly pair), in prefect.yaml: `regdpo deploy`.
"""

from __future__ import annotations

from pipelines.logs import quiet_progress_bars, route_library_logs

quiet_progress_bars()  # before anything imports tqdm (see pipelines/logs.py)

import contextlib  # noqa: E402
import functools  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from typing import Any, Literal, Optional  # noqa: E402

from prefect import Flow, flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.deployments import run_deployment  # noqa: E402
from prefect.events import emit_event  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402
from prefect.states import Cancelled, Failed, State  # noqa: E402

from pipelines import artifacts, forksafe, slots  # noqa: E402
from pipelines.params import DOC_ARGS, Beta, MaxSteps, Objective, StageName, merge_overrides, workdir_label  # noqa: E402
from regdpo import stages as stage_lib  # noqa: E402
from regdpo.config import Config, load_config  # noqa: E402
from regdpo.errors import TransientError, is_transient  # noqa: E402
from regdpo.stages.describe import reject_lines, summary_line  # noqa: E402
from regdpo.stages.parallel import PoolStopped  # noqa: E402
from regdpo.stages.registry import STAGE, STAGE_LIST, Stage  # noqa: E402
from regdpo.stages.runner import StageInputError  # noqa: E402
from regdpo.stages.units import UnitStage  # noqa: E402

route_library_logs()
forksafe.install()

# Every stage retries a transient error (CUDA OOM on a shared GPU, an NFS hiccup) once: unit
# stages keep the units they finished, train resumes from its last checkpoint. Nothing else is
# retried (regdpo.errors.is_transient): a second attempt cannot fix a config, an input, a model
# or a bug. USER_ERRORS are reported as one line, without a traceback.
RETRIES: int = 1
RETRY_DELAY_S: float = 30.0
USER_ERRORS: tuple[type[BaseException], ...] = (StageInputError, ValueError, stage_lib.WorkdirLocked,
                                               slots.SlotTimeout)  # a run that gave up waiting: not again
PAIRS_EVENT = "regdpo.pairs.published"  # nightly-train's trigger (prefect.yaml)
GPU_LIMIT = "regdpo-gpu"  # global concurrency limit: one slot per GPU (regdpo serve / deploy create it)
WORK_ITEM_DEPLOYMENT = "regdpo-work-item/work-item"  # prefect.yaml: one work item on the GPU pool
FanOut = Literal["local", "deployments"]
MAX_DISPATCHED = 64  # work-item flow runs in flight at once under deployment fan-out
# Running stage flows' DevicePools (fan_out local) or stop events (deployments), by key: tasks get the key
_POOLS: dict[str, Any] = {}


def one_line(err: BaseException) -> str:
    """An error message on one line (config errors list one field per line)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    # "...these inputs:" followed by one line per item reads as "...these inputs: a; b"
    text = "".join(line + (" " if line.endswith(":") else "; ") for line in lines).rstrip("; ")
    return text or type(err).__name__


def _failed(logger, what: str, err: BaseException, *, traceback: bool = False) -> State:
    reason = f"{what} failed: {one_line(err)}"
    logger.error(reason, exc_info=err if traceback else None)
    return Failed(message=reason, data=err)


def _retry_transient(task_, task_run, state) -> bool:
    """Retry condition: only errors that can pass on their own."""
    return is_transient(state.result(raise_on_failure=False))


def _opts(task_):
    """The task with the current retry delay (tests set RETRY_DELAY_S to 0)."""
    return task_.with_options(retry_delay_seconds=RETRY_DELAY_S)


@functools.cache
def _gpu_limit_size() -> int:
    """Slots of the server's GPU limit, 0 without one (looked up once per process: a flow-run
    process is short-lived, and asking for a missing limit costs seconds per task plus a warning)."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_global_concurrency_limit_by_name(GPU_LIMIT).limit
        except ObjectNotFound:
            return 0


def _gpu_slot(stage: str, devices: int = 1):
    """Slots of the GPU concurrency limit for a GPU stage's work on `devices` devices (at most
    the limit's size); no-op for CPU stages and where the server has no such limit (Prefect's
    temporary local server: one machine, DevicePool). A dead holder's slots are reclaimed, a
    wait is announced and bounded (pipelines/slots.py)."""
    size = _gpu_limit_size() if STAGE[stage].gpu else 0
    if size:
        return slots.slot(GPU_LIMIT, run=flow_run.get_name() or stage, say=get_run_logger().info,
                          count=min(devices, size))
    return contextlib.nullcontext()


def _result(result) -> dict[str, Any]:
    return {"stage": result.name, "path": str(result.path), "fingerprint": result.fingerprint,
            "skipped": result.skipped, "seconds": round(result.seconds, 3), "summary": result.summary}


@task(name="run-stage", task_run_name="{name}", cache_policy=NO_CACHE, retries=RETRIES,
      retry_delay_seconds=RETRY_DELAY_S, retry_condition_fn=_retry_transient)
def run_stage_task(cfg: Config, name: str, force: bool = False) -> dict[str, Any]:
    """Run a whole stage (train, evaluate) in one go, skipped when current and not forced."""
    with _gpu_slot(name):
        return _result(stage_lib.run(cfg, name, force=force))


def _stopped(stage: str, index: int) -> State:
    """A work item's end when its stage stopped first (an interrupt, a cancelled run): Cancelled,
    so it is never retried."""
    return Cancelled(message=f"{stage}-{index}: its stage stopped before the work item finished")


@task(name="work-item", task_run_name="{stage}-{index}", cache_policy=NO_CACHE, retries=RETRIES,
      retry_delay_seconds=RETRY_DELAY_S, retry_condition_fn=_retry_transient)
def work_item_task(pool_key: str, stage: str, index: int, item: dict[str, Any]) -> dict[str, Any] | State:
    """One work item on a free local device (blocks until one is free); idempotent. The stage
    holds the GPU slots of its devices (`_TaskPool.map`)."""
    pool = _POOLS.get(pool_key)
    try:
        if pool is None or pool.stopped:
            raise PoolStopped(stage)
        return pool.run(item)
    except PoolStopped:
        return _stopped(stage, index)


@task(name="work-item-run", task_run_name="{stage}-{index}", cache_policy=NO_CACHE, retries=RETRIES,
      retry_delay_seconds=RETRY_DELAY_S, retry_condition_fn=_retry_transient)
def dispatch_item_task(pool_key: str, config_path: str, overrides: dict[str, Any] | None, stage: str, index: int,
                       item: dict[str, Any]) -> dict[str, Any] | State:
    """One work item as a run of the work-item deployment (any worker of its pool); waits for it.

    The run is created with an idempotency key (this stage run, item, attempt): a retry after a
    hiccup while creating it gets the same run back instead of a duplicate; a retry after the
    run failed makes a new one. Waiting rides out transient API errors. When the stage stops
    meanwhile, the item's run is cancelled and the task ends Cancelled."""
    from prefect.runtime import task_run

    stop = _POOLS.get(pool_key)
    if stop is None or stop.is_set():
        return _stopped(stage, index)
    key = f"{flow_run.get_id()}:{stage}-{index}:attempt-{task_run.get_run_count()}"
    created = run_deployment(WORK_ITEM_DEPLOYMENT, parameters={"config_path": config_path, "item": item,
                                                               "overrides": overrides},
                             timeout=0, idempotency_key=key)
    run = _wait_for_flow_run(created.id, stop=stop)
    if run is None:
        _cancel_flow_run(created.id)
        return _stopped(stage, index)
    if not run.state or not run.state.is_completed():
        # Crashed: its worker or process died (a retry on a live worker can finish it); Failed:
        # the work item itself failed there (e.g. the model does not load), which a retry repeats
        error = TransientError if run.state and run.state.is_crashed() else RuntimeError
        raise error(f"work item {stage}-{index}: flow run {run.name} ended "
                    f"{run.state.name if run.state else 'without a state'}: "
                    f"{(run.state.message if run.state else '') or 'see its logs'}")
    return {"flow_run": run.name}


def _cancel_flow_run(flow_run_id) -> None:
    """Ask for a flow run's cancellation (its worker stops it); best effort."""
    from prefect import get_client
    from prefect.states import Cancelling

    with contextlib.suppress(Exception), get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Cancelling(message="its stage stopped"), force=True)


def _wait_for_flow_run(flow_run_id, poll_s: float = 2.0, max_api_errors: int = 30,
                       stop: threading.Event | None = None):
    """The flow run once its state is final (None once `stop` is set); up to `max_api_errors`
    failed reads in a row (a server restart, a timeout under load) are waited out rather than
    failing the work item."""
    from prefect import get_client

    errors = 0
    while stop is None or not stop.is_set():
        try:
            with get_client(sync_client=True) as client:
                run = client.read_flow_run(flow_run_id)
            errors = 0
        except Exception as err:  # noqa: BLE001 - transient API trouble; the run itself goes on
            errors += 1
            if errors > max_api_errors or not is_transient(err):
                raise
            run = None
        if run is not None and run.state is not None and run.state.is_final():
            return run
        if stop is not None:
            stop.wait(poll_s)
        else:
            time.sleep(poll_s)
    return None


class _TaskPool:
    """What `regdpo.stages.run` maps a unit stage's work items over under Prefect: each item a
    task, on a local DevicePool (`fan_out` local, the stage holding one GPU slot per device) or
    as a run of the work-item deployment on any worker of the GPU pool (`deployments`, each run
    holding its slot); one progress line per finished item.

    An interrupt or a cancellation (KeyboardInterrupt, Prefect's TerminationSignal: anything that
    is not an Exception) stops the items at once: the pool stops (a running item is interrupted,
    device processes killed) or the dispatched runs are cancelled, and their tasks end Cancelled,
    never retried. Prefect's engine waits for running tasks before it records the run's end."""

    def __init__(self, cfg: Config, name: str, fan_out: str, config_path: str, overrides, logger):
        self.cfg, self.name, self.fan_out = cfg, name, fan_out
        self.config_path, self.overrides, self.logger = config_path, overrides, logger

    def map(self, items: list, progress: Any = None) -> None:
        """Every item as a task; `progress` (regdpo.stages.accounting.Progress) gives the line
        logged as each one ends."""
        pool_key = uuid.uuid4().hex
        if self.fan_out == "local":
            pool = _POOLS[pool_key] = stage_lib.DevicePool(self.cfg, self.name)
            stop, window = pool.stop, len(pool.devices) + 1  # every device busy, one item queued

            def submit(i):
                return _opts(work_item_task).submit(pool_key, self.name, i.index, i.to_dict())
        else:
            pool, event = None, threading.Event()
            _POOLS[pool_key], stop, window = event, event.set, MAX_DISPATCHED

            def submit(i):
                return _opts(dispatch_item_task).submit(pool_key, self.config_path, self.overrides, self.name,
                                                        i.index, i.to_dict())
        try:
            # local: the slots of this machine's devices, for the whole stage (its items share them)
            with _gpu_slot(self.name, devices=len(pool.devices)) if pool is not None else contextlib.nullcontext():
                try:
                    self._run_items(items, submit, window, progress)
                except BaseException as err:
                    if not isinstance(err, Exception):  # an interrupt or a cancellation: stop the items now
                        stop()
                    raise
        finally:
            _POOLS.pop(pool_key, None)
            if pool is not None:
                pool.close()

    def _run_items(self, items: list, submit, window: int, progress: Any) -> None:
        futures = [submit(i) for i in items[:window]]
        errors = []
        for n, item in enumerate(items, start=1):
            try:
                futures[n - 1].result()
            except Exception as err:  # noqa: BLE001 - the others finish; their units are kept
                errors.append(err)
            if n - 1 + window < len(items):
                futures.append(submit(items[n - 1 + window]))
            line = progress.item_done(item) if progress is not None else f"{self.name}: {n}/{len(items)} work items"
            self.logger.info("%s (%s)", line, self.fan_out)
        if errors:
            raise errors[0]


def _run_stage(name: str, config_path: str, force: bool, overrides: dict[str, Any] | None,
               fan_out: str = "local") -> dict[str, Any] | State:
    logger = get_run_logger()
    try:
        cfg = load_config(config_path, overrides)
        stage_lib.check_inputs(cfg, [name])
    except USER_ERRORS as err:
        return _failed(logger, name, err)
    logger.info("%s: %s (workdir %s)", name, "redo" if force else "run unless current", cfg.workdir)
    try:
        if isinstance(stage_lib.get_impl(name), UnitStage):
            pool = _TaskPool(cfg, name, fan_out, str(config_path), overrides, logger)
            out = _result(stage_lib.run(cfg, name, force=force, pool=pool,
                                        command=f"regdpo flow {name} (workdir {cfg.workdir})"))
        else:
            out = _opts(run_stage_task)(cfg, name, force)
    except Exception as err:  # noqa: BLE001 - report one line
        # the traceback once, on the run's log, for what is neither a user error (the line says it
        # all) nor a transient error that exhausted its retry (its task logged it)
        return _failed(logger, name, err, traceback=not isinstance(err, USER_ERRORS) and not is_transient(err))
    if out["skipped"]:
        logger.info("%s: current (fingerprint %s), skipped: %s", name, out["fingerprint"], out["path"])
    else:
        logger.info("%s: done in %.1f s -> %s: %s", name, out["seconds"], out["path"], summary_line(out["summary"]))
        if name == "ingest":
            lines, total = reject_lines(cfg.workdir)
            if total:
                logger.warning("ingest: %d input(s) rejected (table in the artifacts, all in %s/rejects.parquet):\n%s%s",
                               total, out["path"], "\n".join(lines),
                               f"\n... and {total - len(lines)} more" if total > len(lines) else "")
    artifacts.publish(out, cfg.workdir, logger)
    return out


def _stage_run_name(stage: str):
    """flow_run_name callback: '<stage> <last two parts of the workdir>', e.g. 'train runs/demo'."""

    def name() -> str:
        params = flow_run.parameters
        return f"{stage} {workdir_label(params)}" + (" (redo)" if params.get("force") else "")

    return name


def _args_doc(names: list[str], extra: dict[str, str]) -> str:
    docs = {**DOC_ARGS, **extra}
    return "\n".join(f"    {n}: {docs[n]}" for n in names)


_FORCE_DOC = ("Redo the stage even if it is current (what `regdpo run --stage` does). "
              "False: skip it when its outputs match the config and inputs.")


def _stage_flow(stage: Stage) -> Flow:
    """The flow of one registry stage: train-shaping parameters only where the stage reads the
    `train` section, `fan_out` only where the stage has units to spread."""
    if "train" in stage.sections:
        def body(config_path: str, force: bool = True, workdir: Optional[str] = None, max_steps: MaxSteps = None,
                 beta: Beta = None, objective: Objective = None,
                 overrides: Optional[dict[str, Any]] = None) -> dict[str, Any]:
            merged = merge_overrides(overrides, workdir=workdir, max_steps=max_steps, beta=beta, objective=objective)
            return _run_stage(stage.name, config_path, force, merged)

        params = ["config_path", "force", "workdir", "max_steps", "beta", "objective", "overrides"]
    elif stage.units:
        def body(config_path: str, force: bool = True, workdir: Optional[str] = None, fan_out: FanOut = "local",
                 overrides: Optional[dict[str, Any]] = None) -> dict[str, Any]:
            return _run_stage(stage.name, config_path, force, merge_overrides(overrides, workdir=workdir), fan_out)

        params = ["config_path", "force", "workdir", "fan_out", "overrides"]
    else:
        def body(config_path: str, force: bool = True, workdir: Optional[str] = None,
                 overrides: Optional[dict[str, Any]] = None) -> dict[str, Any]:
            return _run_stage(stage.name, config_path, force, merge_overrides(overrides, workdir=workdir))

        params = ["config_path", "force", "workdir", "overrides"]
    body.__name__ = body.__qualname__ = f"{stage.name}_flow"
    summary = f"{stage.name}: {stage.summary}; writes <workdir>/{stage.dir}/" + (" (GPU)" if stage.gpu else "")
    body.__doc__ = f"{summary}.\n\nArgs:\n{_args_doc(params, {'force': _FORCE_DOC})}\n"
    return flow(name=f"regdpo-{stage.name}", flow_run_name=_stage_run_name(stage.name), description=summary)(body)


STAGE_FLOWS: dict[str, Flow] = {s.name: _stage_flow(s) for s in STAGE_LIST}
# Module attributes for prefect.yaml entrypoints (pipelines/flows.py:<stage>_flow).
globals().update({fl.fn.__name__: fl for fl in STAGE_FLOWS.values()})


def _pipeline_run_name() -> str:
    params = flow_run.parameters
    requested = params.get("stages") or stage_lib.STAGES
    try:
        names = stage_lib.order(requested)
    except ValueError:  # the flow body reports it; the name must not fail first
        names = list(requested)
    return f"pipeline {'+'.join(names)} {workdir_label(params)}" + (" (redo)" if params.get("force") else "")


def _announce_pairs(cfg: Config, config_path: str, results: list[dict[str, Any]]) -> None:
    """Tell automations that new pairs exist (nightly-train's trigger), when encode published."""
    encode = next((r for r in results if r["stage"] == "encode"), None)
    if encode is None or encode["skipped"]:
        return
    emit_event(
        event=PAIRS_EVENT,
        resource={"prefect.resource.id": f"regdpo.workdir.{cfg.workdir}", "prefect.resource.name": cfg.workdir},
        payload={"config_path": config_path, "workdir": cfg.workdir, "summary": encode["summary"]},
    )


@flow(name="regdpo-pipeline", flow_run_name=_pipeline_run_name,
      description="ingest -> generate -> encode -> train -> evaluate; current stages are skipped")
def regdpo_pipeline(
    config_path: str,
    stages: Optional[list[StageName]] = None,
    force: bool = False,
    workdir: Optional[str] = None,
    max_steps: MaxSteps = None,
    beta: Beta = None,
    objective: Objective = None,
    fan_out: FanOut = "local",
    overrides: Optional[dict[str, Any]] = None,
) -> list[dict[str, Any]]:
    """Run the requested stages in pipeline order, each as a subflow; stages whose outputs are current are skipped.

    Stages not requested are read from disk as they are. Everything checkable is checked before the
    first stage runs (inputs of every requested stage, the manifest, the model path), so a mistake
    fails in seconds, once, without a retry. One run per workdir: a second run on the same workdir
    fails at once, naming the run that holds it.

    Args:
        config_path: YAML config, relative to the project directory (e.g. configs/wan2.1-t2v-1.3b.yaml) or absolute.
        stages: Stages to run, in pipeline order whatever the order given; empty: all five.
        force: Redo every requested stage even if it is current.
        workdir: Where the stages read and write (overrides the config's workdir; relative to the config file).
        max_steps: Training steps (overrides train.max_steps).
        beta: DPO beta for the mean-squared-error reduction (overrides train.beta; 1000 is the default).
        objective: reg-dpo, dpo or sft (overrides train.objective).
        fan_out: Where generate/encode work items run. local: this machine's devices, one process per device; deployments: each item as a run of the work-item deployment, shared by the workers of its pool over a shared workdir.
        overrides: Any other config values as dotted keys, e.g. {"generate.num_inference_steps": 30}.
    """
    logger = get_run_logger()
    merged = merge_overrides(overrides, workdir=workdir, max_steps=max_steps, beta=beta, objective=objective)
    held = contextlib.ExitStack()
    try:
        cfg = load_config(config_path, merged)
        names = stage_lib.order(stages or None)
        stage_lib.check_inputs(cfg, names)
        held.enter_context(stage_lib.workdir_lock(cfg.workdir, command=f"regdpo pipeline {'+'.join(names)}"))
    except USER_ERRORS as err:
        return _failed(logger, "pipeline", err)
    with held:
        logger.info("stages: %s (workdir %s)", ", ".join(names), cfg.workdir)
        results: list[dict[str, Any]] = []
        for name in names:
            extra = {"fan_out": fan_out} if STAGE[name].units else {}
            try:
                results.append(STAGE_FLOWS[name](config_path=config_path, force=force, overrides=merged, **extra))
            except Exception as err:  # noqa: BLE001 - the stage flow logged its reason; end on the same line
                return Failed(message=f"{name} failed: {one_line(err)}", data=err)
    _announce_pairs(cfg, str(config_path), results)
    return results


@flow(name="regdpo-work-item", flow_run_name="{item[stage]}-{item[index]}",
      description="one work item of a unit stage (what a stage flow fans out with fan_out: deployments)")
def work_item_flow(config_path: str, item: dict[str, Any], overrides: Optional[dict[str, Any]] = None,
                   device: Optional[str] = None) -> dict[str, Any]:
    """Do one work item of generate/encode (ingest too) on this worker; its units go to the workdir's staging.

    Idempotent: units already finished are skipped, so a retried or duplicated run costs nothing.
    The stage flow that planned the item publishes once every item is done.

    Args:
        config_path: The stage flow's config (same project layout on every worker).
        item: The work item, as planned by the stage flow (stage, index, units).
        overrides: The stage flow's config overrides.
        device: Device to run on (default: the config's, e.g. cuda).
    """
    logger = get_run_logger()
    try:
        cfg = load_config(config_path, overrides)
        stage = STAGE[item["stage"]].name
    except (KeyError, *USER_ERRORS) as err:
        return _failed(logger, "work item", err)
    with _gpu_slot(stage):
        counts = stage_lib.run_work_item(cfg, item, device=device)
    logger.info("%s: work item %s: %s", stage, item.get("index"), counts)
    return counts


__all__ = ["STAGE_FLOWS", "regdpo_pipeline", "run_stage_task", "work_item_flow",
           *(fl.fn.__name__ for fl in STAGE_FLOWS.values())]
assert tuple(STAGE_FLOWS) == stage_lib.STAGES
