"""Forked children of a flow-run process exit cleanly (a workaround for Prefect 3.8.8).

Prefect's queue services (log and event shippers) register a `threading` exit hook when they
start. A process forked while they run (a torch DataLoader worker, a fork-started
multiprocessing pool) inherits the hook, Prefect's own after-fork reset clears the service's
state, and at the child's exit the hook fails an assertion: the child exits with code 1 and
no traceback, which DataLoader reports as "worker exited unexpectedly" and fails training.
The child has no services of its own to drain, so after a fork the inherited hooks are dropped.
"""

from __future__ import annotations

import os
import threading


def _drop_inherited_service_hooks() -> None:
    from prefect._internal.concurrency.services import _QueueServiceBase

    hooks = getattr(threading, "_threading_atexits", None)
    if hooks is None:
        return
    def owner(hook):  # threading keeps functools.partial(bound method)
        return getattr(getattr(hook, "func", hook), "__self__", None)

    hooks[:] = [h for h in hooks if not isinstance(owner(h), _QueueServiceBase)]


_installed = False


def install() -> None:
    """Register the after-fork cleanup once per process (after Prefect's own fork handlers)."""
    global _installed
    if not _installed and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_drop_inherited_service_hooks)
        _installed = True
