"""Which errors can pass on their own (worth one retry) and which cannot (fail at once).

Transient: CUDA out of memory on a shared GPU, a network filesystem's hiccup (ESTALE, EIO,
a timeout), a lost connection to an API. Everything else is permanent: a config, data or model
error (ValueError and its kin such as ConfigError, StageInputError, FileNotFoundError,
NotImplementedError, a model directory that does not load) and bugs. A retry of a permanent
error costs time and shows the same failure twice, late.

An error is classified where it is raised: a class says what it is with a `transient` class
attribute (`StageInputError.transient = False`), an instance with the same attribute (a failed
work item whose cause was out of memory), or code raises `TransientError` (chained to its cause
with `raise TransientError(...) from err`). `is_transient` reads that first, then the error's
type, then its causes; what it does not recognise is permanent.
"""

from __future__ import annotations

import errno
import sys

# errno values that a second attempt can escape: stale NFS handles, I/O errors of a network
# filesystem, timeouts and dropped connections, a resource busy for now.
TRANSIENT_ERRNOS = frozenset({
    errno.ESTALE, errno.EIO, errno.ETIMEDOUT, errno.EAGAIN, errno.EINTR, errno.ECONNRESET,
    errno.ECONNREFUSED, errno.ECONNABORTED, errno.EPIPE, errno.ENETDOWN, errno.ENETUNREACH,
    errno.ENETRESET, errno.EHOSTDOWN, errno.EHOSTUNREACH,
})
# an API that is there but overloaded or restarting answers with these
TRANSIENT_HTTP_STATUS = frozenset({408, 429, 502, 503, 504})
# errors that say the input or the code is wrong, whatever their cause
PERMANENT_TYPES: tuple[type[BaseException], ...] = (
    ValueError, TypeError, LookupError, AttributeError, NotImplementedError, AssertionError, ImportError,
    MemoryError,  # host memory: the settings ask for more than the machine has
)
_CUDA_OOM_TEXT = ("CUDA out of memory", "CUDA error: out of memory")


class TransientError(RuntimeError):
    """An error that can pass on its own: the same work, tried again later, may succeed."""

    transient = True


def is_transient(exc: BaseException | None) -> bool:
    """Whether retrying the work that raised `exc` can succeed (see the module docstring)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        verdict = _classify(exc)
        if verdict is not None:
            return verdict
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return False


def _classify(exc: BaseException) -> bool | None:
    """True / False when `exc` itself says; None to look at its cause."""
    said = getattr(exc, "transient", None)
    if isinstance(said, bool):
        return said
    if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: stop, never retry
        return False
    torch = sys.modules.get("torch")  # never imported here: whoever raised a torch error has it
    if torch is not None and isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    if isinstance(exc, RuntimeError) and any(text in str(exc) for text in _CUDA_OOM_TEXT):
        return True
    if isinstance(exc, OSError):
        if exc.errno in TRANSIENT_ERRNOS or isinstance(exc, (ConnectionError, TimeoutError)):
            return True
        if exc.errno is not None or isinstance(exc, FileNotFoundError):
            return False  # ENOENT, EACCES, ENOSPC, ...: the path, the permissions, the disk
        # no errno: a library's own OSError (a model directory that does not load); its cause decides
    httpx = sys.modules.get("httpx")  # Prefect's client: a dropped or timed-out API connection
    if httpx is not None:
        if isinstance(exc, httpx.TransportError):
            return True
        if isinstance(exc, httpx.HTTPStatusError):
            return exc.response.status_code in TRANSIENT_HTTP_STATUS
    if isinstance(exc, PERMANENT_TYPES):
        return False
    return None
