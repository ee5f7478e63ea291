"""The `regdpo` command.

    regdpo run configs/demo.yaml                         # the whole pipeline
    regdpo run configs/demo.yaml --stage train --set train.max_steps=5
    regdpo status configs/demo.yaml                      # which stages are current, stale, missing
    regdpo stages                                        # stage names and what each reads
    regdpo serve                                         # one machine: Prefect server, UI, pools, workers
    regdpo deploy [--nightly CONFIG]                     # prefect.yaml's deployments on PREFECT_API_URL

`run` goes through Prefect: its temporary local server by default (stopped with the run, kill -9
included), or the server at PREFECT_API_URL when that is set. `status` and `stages` only read files (no Prefect import).
"""

from __future__ import annotations

import os
import shlex
import signal
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer
import yaml

from regdpo.config import Config, ConfigError, load_config
from regdpo.stages import STAGE, STAGES, StageInputError, check_inputs, order, stage_state
from regdpo.stages.describe import changes, reject_lines, resume_point, summary_line
from regdpo.stages.runner import read_stage_record, stage_dir

app = typer.Typer(
    help="GT-Pair preference data and Reg-DPO fine-tuning for video diffusion models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigArg = Annotated[Path, typer.Argument(help="YAML config (see configs/demo.yaml)", show_default=False)]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", metavar="KEY=VALUE", help="override a config value, e.g. train.max_steps=5 (repeatable)"),
]


def _fail(message: str) -> NoReturn:
    """User error: message on stderr, exit code 2, no traceback."""
    typer.echo(message, err=True)
    raise typer.Exit(code=2)


def _parse_sets(items: list[str] | None) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"expected KEY=VALUE (e.g. train.max_steps=5), got {item!r}", param_hint="--set")
        # YAML typing, as in the config file: 5 -> int, 1e-4 -> float, true -> bool, [a, b] -> list.
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def _load(config: Path, overrides: dict[str, Any]) -> Config:
    try:
        return load_config(config, overrides or None)
    except ConfigError as err:
        _fail(str(err))


def _report_path(cfg: Config) -> Path:
    """The report a person opens: one self-contained HTML file (report.md beside it)."""
    return stage_dir(cfg.workdir, "evaluate") / "report.html"


class _Interrupts:
    """Ctrl-C and SIGTERM during `regdpo run`: the first becomes a KeyboardInterrupt in the main
    thread (the flows end as Crashed on the server, a training torchrun is stopped, finished units
    and checkpoints stay); a second Ctrl-C exits at once (the watchdog stops the server, trainers
    die with their parent). A signal the shell told us to ignore (a script's background job)
    stays ignored."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def name(self) -> str:
        return {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}.get(self.signum, str(self.signum))

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) is not signal.SIG_IGN:
                signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum
            raise KeyboardInterrupt
        if signum == signal.SIGINT:
            os.write(2, b"interrupted again: exiting now\n")
            os._exit(128 + signum)
        # SIGTERM again (Prefect re-sends the one it turned into a TerminationSignal): the cleanup goes on


def _is_interrupt(err: BaseException) -> bool:
    from prefect.exceptions import TerminationSignal

    return isinstance(err, (KeyboardInterrupt, TerminationSignal))


def _use_api(url: str) -> None:
    """Point this process's Prefect clients (every thread's) at `url`."""
    from prefect.context import refresh_global_settings_context

    os.environ["PREFECT_API_URL"] = url
    refresh_global_settings_context()


def _published_since(workdir: str, name: str, since: float) -> bool:
    from datetime import datetime

    rec = read_stage_record(workdir, name) or {}
    try:
        return datetime.strptime(rec["finished_at"], "%Y-%m-%dT%H:%M:%S%z").timestamp() >= int(since)
    except (KeyError, TypeError, ValueError):
        return False


def _resume_command(config: Path, cfg: Config, stages: list[str] | None, force: bool, sets: list[str] | None,
                    started: float) -> str:
    """The command that carries on where an interrupted run stopped. A plain run: the same command
    (current stages are skipped, finished units reused). A redo (`--stage`, `--force`): the stages
    it had not published yet, named (a named stage is redone; the redo that was interrupted keeps
    the units it finished, and training resumes from its checkpoint)."""
    args = ["regdpo", "run", str(config)]
    if stages or force:
        requested = order(stages or None)
        left = [s for s in requested if not _published_since(cfg.workdir, s, started)] or requested
        args += ["--force"] if force and not stages and left == requested else \
            [a for s in left for a in ("--stage", s)]
    args += [a for item in sets or [] for a in ("--set", item)]
    return shlex.join(args)


@app.command()
def run(
    config: ConfigArg,
    stage: Annotated[
        Optional[list[str]],
        typer.Option("--stage", "-s",
                     help=f"rerun only this stage, from what is on disk, even if current (repeatable): {', '.join(STAGES)}"),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="redo every stage of the run even if current")] = False,
    set_: SetOpt = None,
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks (Prefect's and this command's)")] = False,
) -> None:
    """Run the pipeline through Prefect (current stages are skipped), or rerun the named stages."""
    started = time.time()
    overrides = _parse_sets(set_)
    cfg = _load(config, overrides)
    try:
        names = order(stage or None)
        check_inputs(cfg, names)  # fails in milliseconds, before Prefect is even imported
    except (ValueError, StageInputError) as err:
        _fail(str(err))

    # Prefect reads its settings at import; the user's own values (PREFECT_API_URL, ...) win.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from pipelines.server import ServerStartError, TemporaryServer

    interrupts = _Interrupts()
    interrupts.install()
    server = None
    try:
        server = TemporaryServer.start_if_needed()  # it boots while the flows import
        from pipelines.flows import one_line, regdpo_pipeline
        from pipelines.logs import hide_console_tracebacks

        if not debug:
            hide_console_tracebacks()  # the run's logs on the server keep theirs
        if server is not None:
            _use_api(server.wait_ready())
            typer.echo(f"Prefect: temporary server on {server.api_url.removesuffix('/api')} "
                       "(stops with this run; PREFECT_API_URL selects yours)", err=True)
        state = regdpo_pipeline(
            config_path=str(config.resolve()),
            stages=list(stage) if stage else None,
            # Naming a stage is asking for it to run: `--stage evaluate` redoes evaluate alone.
            force=force or bool(stage),
            overrides=overrides or None,
            return_state=True,
        )
    except ServerStartError as err:
        if debug and server is not None:
            typer.echo(server.output_tail(), err=True)
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=1)
    except BaseException as err:
        if interrupts.signum is None or not _is_interrupt(err):
            raise
        typer.echo(f"interrupted ({interrupts.name}): finished units and the last training checkpoint are kept; "
                   f"resume with: {_resume_command(config, cfg, stage, force, set_, started)}", err=True)
        raise typer.Exit(code=128 + interrupts.signum)
    finally:
        if server is not None:
            server.stop()  # last: the runs were marked Crashed on it before
    if not state.is_completed():
        err = state.result(raise_on_failure=False)
        if debug and isinstance(err, BaseException):
            import traceback

            traceback.print_exception(err)
        # The flow's message already says which stage failed and why, on one line.
        message = state.message or (one_line(err) if isinstance(err, BaseException) else state.name)
        hint = "" if debug or isinstance(err, (ValueError, StageInputError)) else " (--debug shows the traceback)"
        typer.echo(f"error: {message}{hint}", err=True)
        raise typer.Exit(code=1)
    results = state.result()

    for r in results:
        state = "skipped" if r["skipped"] else "ran"
        typer.echo(f"{r['stage']:<9} {state:<7} {r['seconds']:8.1f}s  {summary_line(r['summary'])}".rstrip())
        if r["stage"] == "ingest" and not r["skipped"]:
            _echo_rejects(cfg)
    report = _report_path(cfg)
    evaluate_ran = any(r["stage"] == "evaluate" and not r["skipped"] for r in results)
    if report.is_file() and (evaluate_ran or _states(cfg)["evaluate"][0] == "current"):
        typer.echo(f"report: {report}")


def _echo_rejects(cfg: Config) -> None:
    """ingest's rejected inputs: the first few with their reasons, and where all of them are."""
    lines, total = reject_lines(cfg.workdir)
    if not total:
        return
    where = stage_dir(cfg.workdir, "ingest") / "rejects.parquet"
    typer.echo(f"  {total} input{'s' if total != 1 else ''} rejected (all in {where}):")
    for line in lines:
        typer.echo(f"    {line}")
    if total > len(lines):
        typer.echo(f"    ... and {total - len(lines)} more")


def _states(cfg: Config) -> dict[str, tuple[str, str]]:
    """(current | stale | missing, why) per stage (regdpo.stages.stage_state).

    Staleness is transitive: a stage whose input stage would rerun will rerun too, even though
    it is current against the input's published output.
    """
    states: dict[str, tuple[str, str]] = {}
    for name in STAGES:
        state, why = stage_state(cfg, name)
        redo = [up for up in STAGE[name].inputs if states[up][0] != "current"]
        if state == "current" and redo:
            state, why = "stale", f"reruns after {', '.join(redo)}"
        elif state == "current":
            rec = read_stage_record(cfg.workdir, name) or {}
            why = f"{rec.get('finished_at', '')}  {summary_line(rec.get('summary', {}))}".strip()
        elif state == "stale" and read_stage_record(cfg.workdir, name) is not None:
            what = changes(cfg, name)
            if what:  # name what changed, then the stage's own count of work (units to do, ...)
                why = "; ".join(what) + (f" ({why})" if why and "changed since it ran" not in why else "")
        resume = resume_point(cfg, name)
        if resume and why.startswith("interrupted run present"):
            why = resume
        elif resume:
            why = f"{why}; {resume}" if why else resume
        states[name] = (state, why)
    return states


@app.command()
def status(config: ConfigArg, set_: SetOpt = None) -> None:
    """Show which stages are current, stale (would rerun) or missing."""
    cfg = _load(config, _parse_sets(set_))
    typer.echo(f"workdir: {cfg.workdir}")
    for name, (state, why) in _states(cfg).items():
        typer.echo(f"{name:<9} {state:<8} {why}".rstrip())


@app.command()
def stages() -> None:
    """List the stages in order, what each does and what it reads."""
    for st in STAGE.values():
        reads = ", ".join(st.inputs) or "videos + captions (ingest.manifest)"
        typer.echo(f"{st.name:<9} {st.summary}; reads: {reads}; writes: <workdir>/{st.dir}/")


@app.command()
def world(
    out: Annotated[Path, typer.Argument(help="folder for the clips, manifest.csv and world.json (new or empty)",
                                        show_default=False)],
    num_clips: Annotated[int, typer.Option("--num-clips", "-n", min=1, help="how many clips")] = 256,
    seed: Annotated[int, typer.Option(min=0, help="which world: clip i of a seed is always the same clip")] = 0,
    size: Annotated[int, typer.Option(help="frame width and height in pixels (even, >= 16)")] = 32,
    frames: Annotated[int, typer.Option(help="frames per clip")] = 9,
    fps: Annotated[float, typer.Option(help="frames per second")] = 8.0,
    max_objects: Annotated[int, typer.Option("--max-objects", help="shapes per clip: 1 to this")] = 2,
) -> None:
    """Write clips of the synthetic world (coloured shapes moving and bouncing, captions saying what
    happens) as mp4 files and a manifest ingest reads: set ingest.manifest to the printed path."""
    from regdpo.world import WorldSpec, write_world

    try:
        manifest = write_world(out, num_clips, seed=seed, spec=WorldSpec(size, frames, fps, max_objects))
    except ValueError as err:
        _fail(str(err))
    typer.echo(str(manifest))


@app.command()
def compare(
    workdirs: Annotated[list[Path], typer.Argument(help="run workdirs (each with train/ and, ideally, eval/)",
                                                   show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="folder for compare.md, compare.csv and compare.png")] = Path("."),
) -> None:
    """Put several runs' verdicts in one table (every number in the CSV) and their curves in one figure.

    An evaluation older than its run's training is flagged as stale here and in every output."""
    from regdpo.eval.compare import STALE, compare_runs, evaluation_state

    try:
        written = compare_runs(workdirs, out)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
    for workdir in workdirs:
        state, why = evaluation_state(workdir)
        if state == STALE:
            typer.echo(f"warning: {workdir}: stale evaluation: {why}; its held-out columns describe an earlier model",
                       err=True)
    for path in written.values():
        typer.echo(str(path))


@app.command()
def serve(
    port: Annotated[int, typer.Option(help="the server's port")] = 4200,
    host: Annotated[str, typer.Option(help="address to listen on; beyond loopback needs PREFECT_SERVER_API_AUTH_STRING")
                    ] = "127.0.0.1",
    cpu_limit: Annotated[int, typer.Option(min=1, help="flow runs the cpu-pool worker runs at once")] = 2,
    gpu_limit: Annotated[Optional[int], typer.Option(min=1, help="GPU work at once: slots of the regdpo-gpu limit "
                                                     "(default: the GPUs found, or 1); the gpu-pool worker takes one "
                                                     "flow run more, for a run that fans work items out")] = None,
) -> None:
    """One machine: a Prefect server with its UI, the work pools and a worker per pool, until Ctrl-C.

    Then, in another shell: export PREFECT_API_URL=http://127.0.0.1:4200/api; regdpo deploy.
    """
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from pipelines.serve import serve as serve_all

    try:
        code = serve_all(host, port, cpu_limit, gpu_limit, typer.echo)
    except (ValueError, RuntimeError) as err:
        _fail(f"error: {err}")
    raise typer.Exit(code=code)


@app.command()
def deploy(
    nightly: Annotated[Optional[Path], typer.Option(help="config for the nightly deployments; turns their schedule on")
                       ] = None,
    gpus: Annotated[int, typer.Option(min=1, help="slots of the regdpo-gpu limit if it is created now (GPUs in all)")
                    ] = 1,
) -> None:
    """Register prefect.yaml's deployments on the server at PREFECT_API_URL (creating missing pools)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from pipelines.deploy import deploy as deploy_all

    try:
        for name in deploy_all(nightly, gpus, typer.echo):
            typer.echo(f"  {name}")
    except (ValueError, RuntimeError) as err:
        _fail(f"error: {err}")


if __name__ == "__main__":
    app()
