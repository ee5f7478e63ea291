"""Run the train stage's training in one or many processes.

    # every process of your own torchrun runs the train stage; rank 0 does the stage's
    # bookkeeping (workdir lock, fingerprint, atomic publish), all ranks train
    torchrun --nproc-per-node 8 -m regdpo.train.launch configs/wan2.1-t2v-1.3b.yaml [--set train.max_steps=100] [--force]

    # what the train stage itself starts for train.num_processes > 1 (one rank each)
    python -m torch.distributed.run --nproc-per-node N -m regdpo.train.launch --plan <out>/.launch.json

A plan is JSON: the resolved config, the output folder and the shards folder. Rank 0 writes
the outputs; the stage reads the summary rank 0 leaves in <out>/.summary.json.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from regdpo.config import Config, config_from_dict
from regdpo.durable import atomic_write_json
from regdpo.procs import die_with_parent
from regdpo.train import distributed as D

log = logging.getLogger("regdpo.train")
PLAN_NAME, SUMMARY_NAME = ".launch.json", ".summary.json"
STOP_GRACE_S = 10.0  # for torchrun to stop its ranks after SIGTERM; then SIGKILL


def run_plan(plan: dict[str, Any]) -> dict[str, Any]:
    """Train per `plan` here, in the processes of an outer torchrun, or in N processes of our own."""
    cfg = plan_config(plan)
    if D.env_world_size() > 1:  # rank 0 of an outer torchrun; the others wait in `_outer`
        D.broadcast_json({"plan": plan})
        _PLAN_SENT[0] = True
        return train_plan(plan)
    if cfg.train.num_processes > 1:
        return _spawn(plan, cfg.train.num_processes, cfg.train.log_every)
    return train_plan(plan)


_PLAN_SENT = [False]


def plan_config(plan: dict[str, Any]) -> Config:
    return config_from_dict(plan["config"], source="train plan")


def train_plan(plan: dict[str, Any]) -> dict[str, Any]:
    """This process's share of the training (joins the process group if there is one)."""
    from regdpo.models import load_model
    from regdpo.train.loader import PairSource
    from regdpo.train.loop import train

    cfg = plan_config(plan)
    ctx = D.init(cfg.model.device, need_group=cfg.train.parallelism == "fsdp")
    try:
        if D.env_world_size() > 1 and cfg.train.num_processes not in (1, ctx.world_size):
            log.warning("train.num_processes is %d but torchrun started %d processes: using %d",
                        cfg.train.num_processes, ctx.world_size, ctx.world_size)
        spec = load_model(cfg.model.model_copy(update={"device": str(ctx.device)}))
        summary = train(cfg, spec, PairSource.from_index(plan["shards"], "train"), Path(plan["out"]), ctx=ctx)
        if ctx.is_rank0 and plan.get("summary_file"):  # read by the stage that spawned this torchrun
            atomic_write_json(Path(plan["out"]) / SUMMARY_NAME, summary)
        return summary
    finally:
        D.shutdown(ctx)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM to torchrun's process group (torchrun and every rank), SIGKILL to what is left after
    `grace_s`. Checkpoints on disk stay whole (each is written under a temporary name, then renamed)."""
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun if it hangs, ranks it left behind
    proc.wait()


def _spawn(plan: dict[str, Any], num_processes: int, log_every: int) -> dict[str, Any]:
    """torchrun with N processes on this machine; relays their output and progress; returns
    rank 0's summary or raises with the end of their output."""
    out = Path(plan["out"])
    plan_path, summary_path, metrics = out / PLAN_NAME, out / SUMMARY_NAME, out / "metrics.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    summary_path.unlink(missing_ok=True)
    atomic_write_json(plan_path, {**plan, "summary_file": True})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(num_processes),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "regdpo.train.launch", "--plan", str(plan_path)]
    log.info("train: %s", " ".join(cmd[1:]))
    tail: collections.deque[str] = collections.deque(maxlen=40)
    # Its own process group (torchrun and the ranks it starts): an interrupt of this process
    # stops all of them through `_stop` instead of each rank catching the terminal's Ctrl-C on
    # its own; and PR_SET_PDEATHSIG so a killed stage leaves no trainer behind.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=die_with_parent, start_new_session=True)

    stopping = threading.Event()

    def relay() -> None:
        for line in proc.stdout:
            tail.append(line.rstrip())
            if not stopping.is_set():  # torchrun's report of the stop we asked for is noise
                sys.stderr.write(line)

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    seen = _count_lines(metrics)
    try:
        while proc.poll() is None:
            time.sleep(1.0)
            seen = _relay_progress(metrics, seen, log_every)
    except BaseException:  # an interrupt (Ctrl-C, SIGTERM, a cancelled run): stop the trainers, keep checkpoints
        stopping.set()
        _stop(proc)
        raise
    reader.join(timeout=5)
    _relay_progress(metrics, seen, log_every)
    if proc.returncode != 0:
        raise RuntimeError(f"training processes failed (torchrun exit {proc.returncode}); last output:\n"
                           + "\n".join(tail))
    summary = json.loads(summary_path.read_text())
    summary_path.unlink()
    plan_path.unlink()
    return summary


def _count_lines(path: Path) -> int:
    from regdpo.train.observe import read_jsonl

    try:
        return len(read_jsonl(path, warn=False))
    except ValueError:  # a damaged log: the trainer itself refuses it, naming the line
        return 0


def _relay_progress(metrics: Path, seen: int, every: int) -> int:
    """Log rank 0's new metrics rows (every `every` steps) in this process, where an
    orchestrator's log handler sees them. `seen` counts rows; a last line still being written
    (or torn) is not a row yet."""
    from regdpo.train.observe import progress_line, read_jsonl

    try:
        rows = read_jsonl(metrics, warn=False)
    except ValueError:  # a damaged log: the trainer refuses it and fails, naming the file and line
        return seen
    if len(rows) < seen:  # truncated on resume
        seen = 0
    for row in rows[seen:]:
        step = row.get("step")
        if isinstance(step, int) and ((step + 1) % every == 0 or row.get("skipped")):
            log.info("%s", progress_line(row))
    return len(rows)


def _outer(config: str, overrides: dict[str, Any], force: bool) -> None:
    """Every process of a user's torchrun: rank 0 runs the stage, the others join its training."""
    from regdpo.config import load_config

    cfg = load_config(config, overrides or None)
    ctx = D.init(cfg.model.device, need_group=True)
    try:
        if ctx.is_rank0:
            from regdpo.stages import run

            try:
                result = run(cfg, "train", force=force)
                print(f"train {'skipped (current)' if result.skipped else 'done'}: {result.path}", flush=True)
            except BaseException as err:
                if not _PLAN_SENT[0]:
                    D.broadcast_json({"error": f"{type(err).__name__}: {err}"})
                raise
            if not _PLAN_SENT[0]:
                D.broadcast_json({"skip": True})
        else:
            msg = D.broadcast_json(None)
            if "plan" in msg:
                train_plan(msg["plan"])
            elif "error" in msg:
                raise SystemExit(f"rank 0 failed: {msg['error']}")
    finally:
        D.shutdown(ctx)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Run the train stage in every process of a torchrun.")
    p.add_argument("config", nargs="?", help="YAML config (outer torchrun)")
    p.add_argument("--plan", help="a train stage's plan (the torchrun the stage starts)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--force", action="store_true", help="redo the stage even if current")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.plan is None else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    if args.plan:
        die_with_parent()  # a killed stage leaves no trainer writing into its folder
        train_plan(json.loads(Path(args.plan).read_text()))
        return
    if not args.config:
        p.error("give a config (or --plan)")
    import yaml

    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = yaml.safe_load(value)
    _outer(args.config, overrides, args.force)


if __name__ == "__main__":
    main()
