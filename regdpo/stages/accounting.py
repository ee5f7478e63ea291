"""What a unit stage did with its units (done, reused, failed) and whether it may publish.

A unit that fails (an exception, an unusable generation) is left out of the published tables
and retried by the next run. A few failed clips must not hold up thousands of good ones, but a
stage whose units mostly fail has a cause that is not the clips (the model, the settings), and
publishing it would mark it current and hand the next stage nothing. So a stage publishes while

    failed <= <stage>.max_failed_fraction x units   and   not every unit failed

and otherwise fails with one line that counts the reasons, e.g.
`10 of 10 units failed: 10 x RuntimeError: expected input with 36 channels, got 16`.
Units are the stage's wanted units (reused ones included); the failed ones are those with a
failure note in staging and no result. Below the bound the stage publishes, and its failures
go into stage.json's summary (`units_failed`, `failure_reasons`, `failed`), `regdpo status`
and a warning line.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

REASON_CHARS = 200  # a reason as it is grouped and shown: its first line, this long at most
SHOWN_REASONS = 3  # reasons spelled out in the one line; the rest are counted


class UnitsFailed(RuntimeError):
    """Too many units of a stage failed for it to publish (see the module docstring).

    Transient when every failure was (out of memory on a shared GPU, a network filesystem):
    the same units may succeed on a retry."""

    def __init__(self, stage: str, message: str, *, failed: int, units: int, transient: bool):
        super().__init__(message)
        self.stage, self.failed, self.units, self.transient = stage, failed, units, transient


def first_line(reason: str) -> str:
    line = next((part.strip() for part in str(reason).splitlines() if part.strip()), "")
    return line if len(line) <= REASON_CHARS else line[:REASON_CHARS - 3] + "..."


def reason_counts(failures: list[dict[str, Any]]) -> dict[str, int]:
    """Failures grouped by the first line of their reason, most frequent first (ties by reason)."""
    counts = Counter(first_line(f.get("reason", "")) for f in failures)
    return dict(sorted(counts.items(), key=lambda rc: (-rc[1], rc[0])))


def reasons_text(reasons: dict[str, int]) -> str:
    """`2 x <reason>; 1 x <reason>`: the most frequent SHOWN_REASONS, the rest counted."""
    shown = [f"{n} x {r}" for r, n in list(reasons.items())[:SHOWN_REASONS]]
    if len(reasons) > SHOWN_REASONS:
        rest = sum(list(reasons.values())[SHOWN_REASONS:])
        shown.append(f"{rest} more with {len(reasons) - SHOWN_REASONS} other reasons")
    return "; ".join(shown)


def failures_line(num_failed: int, num_units: int, reasons: dict[str, int]) -> str:
    """`3 of 10 units failed: 2 x <reason>; 1 x <reason>`."""
    return f"{num_failed} of {num_units} units failed: {reasons_text(reasons)}"


def check_failures(stage: str, num_units: int, failures: list[dict[str, Any]], max_fraction: float,
                   where: str) -> None:
    """Raise UnitsFailed if the failures keep the stage from publishing; `where` says where the
    failure notes (with tracebacks) are."""
    if not failures:
        return
    failed = len(failures)
    if failed < num_units and failed <= max_fraction * num_units:
        return
    bound = ("every unit failed" if failed >= num_units
             else f"more than {stage}.max_failed_fraction = {max_fraction:g} of the units")
    message = (f"{failures_line(failed, num_units, reason_counts(failures))} ({bound}; nothing published, the "
               f"finished units are kept for the next run; details in {where})")
    raise UnitsFailed(stage, message, failed=failed, units=num_units,
                      transient=all(f.get("transient", False) for f in failures))


class Progress:
    """Counts a unit stage's units as its work items finish and says where it stands, one line
    per item: `generate: 3/4 work items; 12 units: 6 done, 2 reused, 1 failed, 3 to do`.

    Counted from the staging area (a unit is done when sealed, failed when it has a failure
    note), so it holds whichever process or machine did the item."""

    def __init__(self, stage: str, num_units: int, num_reused: int, items: list, staging):
        self.stage, self.num_units, self.num_reused, self.staging = stage, num_units, num_reused, staging
        self.num_items, self.items_done = len(items), 0
        self.todo = sum(len(item.units) for item in items)
        self.done = self.failed = 0

    def item_done(self, item) -> str:
        """Count a finished (or failed) work item's units; the progress line."""
        self.items_done += 1
        for unit in item.units:
            if self.staging.is_done(unit.key):
                self.done += 1
            elif self.staging.failure(unit.key) is not None:
                self.failed += 1
        return self.line()

    def line(self) -> str:
        left = self.todo - self.done - self.failed
        return (f"{self.stage}: {self.items_done}/{self.num_items} work items; {self.num_units} units: "
                f"{self.done} done, {self.num_reused} reused, {self.failed} failed, {left} to do")
