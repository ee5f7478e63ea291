"""What a training run shows while it runs (rank 0 only).

- `metrics.jsonl`: one line per step (METHOD.md's diagnostics, lr, grad_norm, whether the
  step was skipped, step_time, pairs_per_s, peak_mem_bytes); non-finite values as null.
- TensorBoard event files in `tensorboard/` when the `tensorboard` package is installed
  (`pip install -e ".[tensorboard]"`).
- A tqdm progress bar with loss, DGR and win gap, only when stderr is a terminal.
- Every `train.log_every` steps a plain log line on the "regdpo.train" logger (step, loss,
  dgr, win gap, lose gap, ...), so orchestrators show progress without progress-bar spam.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from regdpo.durable import TMP_MARK, atomic_write_text

log = logging.getLogger("regdpo.train")

# Keys of a metrics row that measure the machine, not the trajectory.
TIMING_KEYS = ("step_time", "pairs_per_s", "peak_mem_bytes")


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_jsonl(path: Path, *, skip_bad: bool = False, warn: bool = True) -> list[dict[str, Any]]:
    """The rows of an append-only JSON-lines log; see `read_jsonl_lines`."""
    return [row for _, row in read_jsonl_lines(path, skip_bad=skip_bad, warn=warn)]


def read_jsonl_lines(path: Path, *, skip_bad: bool = False, warn: bool = True) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) of an append-only JSON-lines log (blank lines skipped; no file: none).

    A torn last line (a write cut short by a kill or a full disk) is dropped, with a warning
    naming the file and the line unless `warn` is False (a reader that polls a log still being
    written). Any other line that is not a JSON object means the log was edited or damaged:
    ValueError naming the file and the line, or, with `skip_bad` (readers that only show the
    log, such as the report's plots), the line is dropped with a warning too.
    """
    path = Path(path)
    if not path.is_file():
        return []
    numbered = [(i, line) for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if line.strip()]
    rows: list[tuple[int, dict[str, Any]]] = []
    for i, line in numbered:
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:  # JSONDecodeError is a ValueError
            if (i, line) == numbered[-1]:
                if warn:
                    log.warning("%s: dropping its torn last line %d (a write cut short: %s)", path, i, err)
                continue
            if not skip_bad:
                raise ValueError(f"{path}: line {i} is not a JSON object ({err}); the log was edited or damaged: "
                                 "restore it, or start training fresh (train.resume: fresh)") from None
            log.warning("%s: skipping line %d (%s)", path, i, err)
            continue
        rows.append((i, row))
    return rows


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's rows, each with an integer step (see `read_jsonl` for a torn last line)."""
    rows = read_jsonl_lines(path)
    for i, row in rows:
        if not isinstance(row.get("step"), int) or isinstance(row["step"], bool):
            raise ValueError(f"{path}: line {i} has no integer \"step\"; the log was edited or damaged: restore "
                             "it, or start training fresh (train.resume: fresh)")
    return [row for _, row in rows]


def truncate_metrics(path: Path, step: int) -> None:
    """Drop logged steps >= `step` (written after the checkpoint a run resumes from) and a torn
    last line, atomically: readers see the old file or the whole new one, even after a kill."""
    path = Path(path)
    for leftover in path.parent.glob(f"{path.name}{TMP_MARK}*"):  # of a rewrite killed before its rename
        leftover.unlink(missing_ok=True)
    if not path.is_file():
        return
    rows = [r for r in read_metrics(path) if r["step"] < step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _tensorboard(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional extra
        return None
    return SummaryWriter(str(log_dir))


PROGRESS_KEYS = ("loss", "s", "dgr", "win_gap", "lose_gap", "implicit_acc", "lr", "pairs_per_s")


def progress_line(row: dict[str, Any], end_step: int | None = None) -> str:
    """'step 10/200  loss 789.2  s -3.1e-05  dgr 494.8 ...' for a metrics row: 4 significant
    digits, missing values left out, and "SKIPPED (non-finite)" only on a skipped step."""
    done = int(row.get("step", -1)) + 1
    parts = [f"step {done}" + (f"/{end_step}" if end_step else "")]
    for key in PROGRESS_KEYS:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(f"{key} {value:.4g}")
    if row.get("skipped"):
        parts.append("SKIPPED (non-finite loss or gradient)")
    return "  ".join(parts)


class TrainLog:
    def __init__(self, out_dir: Path, *, start_step: int, end_step: int, log_every: int, enabled: bool):
        self.enabled, self.log_every, self.end_step = enabled, log_every, end_step
        self._file = self._tb = self._bar = None
        if not enabled:
            return
        path = Path(out_dir) / "metrics.jsonl"
        truncate_metrics(path, start_step)
        self._file = path.open("a")
        self._tb = _tensorboard(Path(out_dir) / "tensorboard")
        self._bar = tqdm(total=end_step, initial=start_step, desc="train", unit="step",
                         disable=not sys.stderr.isatty())

    def record(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {k: _clean(v) for k, v in row.items()}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        step = row["step"]
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"train/{key}", value, step)
        self._bar.update(1)
        self._bar.set_postfix({k: f"{row[k]:.4g}" for k in ("loss", "dgr", "win_gap") if row.get(k) is not None})
        done = step + 1
        if done % self.log_every == 0 or done == self.end_step or row.get("skipped"):
            log.info("%s", progress_line(row, self.end_step))

    def close(self) -> None:
        for handle in (self._file, self._bar):
            if handle is not None:
                handle.close()
        if self._tb is not None:
            self._tb.close()
