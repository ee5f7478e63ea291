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

log = logging.getLogger("regdpo.train")

# Keys of a metrics row that measure the machine, not the trajectory.
TIMING_KEYS = ("step_time", "pairs_per_s", "peak_mem_bytes")


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(path: Path, step: int) -> None:
    """Drop logged steps >= `step` (written after the checkpoint a run resumes from), atomically."""
    rows = [r for r in read_metrics(path) if r["step"] < step]
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def _tensorboard(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional extra
        return None
    return SummaryWriter(str(log_dir))


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
            log.info("step %d/%d %s", done, self.end_step, "  ".join(
                f"{k} {row[k]:.4g}" if isinstance(row.get(k), float) else f"{k} {row.get(k)}"
                for k in ("loss", "dgr", "win_gap", "lose_gap", "implicit_acc", "lr", "pairs_per_s", "skipped")
                if k in row))

    def close(self) -> None:
        for handle in (self._file, self._bar):
            if handle is not None:
                handle.close()
        if self._tb is not None:
            self._tb.close()
