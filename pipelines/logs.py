"""The library's log lines in Prefect's run logs; no progress bars in worker logs.

The library logs plain progress lines on python loggers under `regdpo` and never imports
prefect. Here the `regdpo` logger gets the handlers of Prefect's `prefect.extra` logger (what
Prefect's own PREFECT_LOGGING_EXTRA_LOGGERS setting does at import, done here so it holds
whatever the environment says), so those lines reach the run's page in the UI.

tqdm bars belong on a terminal. Off a terminal (a worker's flow-run process, CI, a redirected
`regdpo run`) each bar redraw is appended to one line that grows to tens of KB in the worker
log, so tqdm is switched off there. tqdm reads TQDM_DISABLE when it is first imported, so
`quiet_progress_bars` must run before the library's stage modules are imported.
"""

from __future__ import annotations

import logging
import os
import sys

LIBRARY_LOGGER = "regdpo"


def quiet_progress_bars() -> None:
    """Disable tqdm when stderr is not a terminal (unless the user set TQDM_DISABLE)."""
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_DISABLE", "1")


class _InRunsOnly(logging.Handler):
    """Passes records to `inner` only inside a flow or task run: outside one (a notebook, a
    test, a thread without the run's context) Prefect's API handler would warn on every line."""

    def __init__(self, inner: logging.Handler):
        super().__init__()
        self.inner = inner

    def emit(self, record: logging.LogRecord) -> None:
        from prefect.context import FlowRunContext, TaskRunContext

        if FlowRunContext.get() is not None or TaskRunContext.get() is not None:
            self.inner.handle(record)


def route_library_logs(level: int = logging.INFO) -> None:
    """Attach Prefect's run-log handlers to the `regdpo` logger, for records made inside runs (idempotent)."""
    library = logging.getLogger(LIBRARY_LOGGER)
    if library.level == logging.NOTSET or library.level > level:
        library.setLevel(level)
    routed = {h.inner for h in library.handlers if isinstance(h, _InRunsOnly)}
    for handler in logging.getLogger("prefect.extra").handlers:
        if handler not in routed:
            library.addHandler(_InRunsOnly(handler))


class _WithoutTraceback(logging.Formatter):
    """Formats a record as `inner` would, minus its traceback (the record itself is untouched,
    so other handlers, e.g. the one sending logs to the server, still get the traceback)."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def hide_console_tracebacks() -> None:
    """Keep tracebacks out of the terminal: Prefect's console handlers print records without them."""
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    for lg in loggers:
        for handler in lg.handlers:
            if isinstance(handler, PrefectConsoleHandler) and not isinstance(handler.formatter, _WithoutTraceback):
                handler.setFormatter(_WithoutTraceback(handler.formatter))
