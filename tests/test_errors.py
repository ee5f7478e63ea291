"""Transient vs permanent errors (regdpo/errors.py): only what can pass on its own is retried."""

from __future__ import annotations

import errno

import httpx
import pytest
import torch

from regdpo.config import ConfigError
from regdpo.errors import TransientError, is_transient
from regdpo.stages.lock import WorkdirLocked
from regdpo.stages.parallel import WorkItemError
from regdpo.stages.runner import StageInputError

TRANSIENT = {
    "torch CUDA OOM": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    "CUDA OOM as RuntimeError": RuntimeError("CUDA error: out of memory"),
    "stale NFS handle": OSError(errno.ESTALE, "Stale file handle"),
    "I/O error": OSError(errno.EIO, "Input/output error"),
    "timeout": TimeoutError("timed out"),
    "connection reset": ConnectionResetError(errno.ECONNRESET, "reset by peer"),
    "lost API connection": httpx.ConnectError("All connection attempts failed"),
    "API read timeout": httpx.ReadTimeout("timed out"),
    "API restarting": httpx.HTTPStatusError("503", request=httpx.Request("GET", "http://x"),
                                            response=httpx.Response(503)),
    "said so": TransientError("the GPU was taken"),
    "device process died": WorkItemError("device process cuda:1 died (exit code -9)", transient=True),
}
PERMANENT = {
    "not implemented": NotImplementedError("image-to-video for this family"),
    "missing file": FileNotFoundError(errno.ENOENT, "No such file", "/models/wan/transformer"),
    "bad value": ValueError("a clip has no caption"),
    "config": ConfigError("train.beta: must be > 0"),
    "stage input": StageInputError("run ingest first"),
    "workdir locked": WorkdirLocked("held by pid 1"),
    "model does not load": OSError("Error no file named diffusion_pytorch_model.safetensors found in directory"),
    "permission": PermissionError(errno.EACCES, "Permission denied"),
    "disk full": OSError(errno.ENOSPC, "No space left on device"),
    "a bug": RuntimeError("index out of range"),
    "shape mismatch": RuntimeError("expected input with 36 channels, got 16"),
    "API says not found": httpx.HTTPStatusError("404", request=httpx.Request("GET", "http://x"),
                                                response=httpx.Response(404)),
    "interrupt": KeyboardInterrupt(),
    "host memory": MemoryError(),
    "worker failed on a model error": WorkItemError("could not start the generate worker", transient=False),
    "nothing": None,
}


@pytest.mark.parametrize("name", TRANSIENT)
def test_transient(name):
    assert is_transient(TRANSIENT[name])


@pytest.mark.parametrize("name", PERMANENT)
def test_permanent(name):
    assert not is_transient(PERMANENT[name])


def _raise(outer, cause, *, implicit=False):
    try:
        try:
            raise cause
        except BaseException as inner:
            if implicit:
                raise outer  # noqa: B904 - an implicit context, as a failing cleanup leaves it
            raise outer from inner
    except BaseException as err:
        return err


def test_causes_decide_what_the_error_itself_does_not():
    oom = torch.OutOfMemoryError("CUDA out of memory")
    assert is_transient(_raise(RuntimeError("training processes failed"), oom))
    assert is_transient(_raise(RuntimeError("cleanup failed"), oom, implicit=True))
    assert is_transient(_raise(OSError("could not write the checkpoint"), OSError(errno.EIO, "I/O error")))
    # what the error itself says wins over its cause
    assert not is_transient(_raise(ValueError("bad config"), oom))
    assert is_transient(_raise(TransientError("retry me"), ValueError("x")))
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__cause__, b.__cause__ = b, a  # a cycle of unknown errors ends, permanent
    assert not is_transient(a)
