"""Progress lines: what a long loop says in a log (a Prefect run's page, a worker's log file),
where a progress bar would be one ever-growing line.

    progress = ProgressLog(log, "generate: work item 0", total=40, unit="clips")
    for batch in batches:
        ...
        progress.update(len(batch))   # "generate: work item 0: 8/40 clips (21 s)" about every tenth

tqdm bars stay for terminals (they are switched off elsewhere, pipelines/logs.py); these lines are
plain log records, so they also reach the terminal of `regdpo run` through its log handler.
"""

from __future__ import annotations

import logging
import math
import time


class ProgressLog:
    """One INFO line every `total / lines` items (at least every item) and at the last one."""

    def __init__(self, logger: logging.Logger, what: str, total: int, *, unit: str = "units", lines: int = 10):
        self.logger, self.what, self.total, self.unit = logger, what, total, unit
        self.every = max(1, math.ceil(total / max(1, lines)))
        self.done = 0
        self.start = time.perf_counter()

    def update(self, n: int = 1) -> None:
        before, self.done = self.done, self.done + n
        if self.done >= self.total or self.done // self.every > before // self.every:
            self.logger.info("%s: %d/%d %s (%.0f s)", self.what, self.done, self.total, self.unit,
                             time.perf_counter() - self.start)
