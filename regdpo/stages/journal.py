"""Publication that no kill can tear: a roll-forward journal over atomic writes (durable.py).

A stage publishes several files at once (a table, stage.json, unit files moved out of staging,
old files deleted). It first writes every new file under a temporary name, then writes ONE
journal file atomically: that instant is the commit. Applying the journal (renames, deletes)
is idempotent, so a run killed halfway through it is completed by `recover` at the start of the
next run (under the workdir lock) - or by anyone calling `recover`. A journal that was never
written leaves only temporary files, which `recover` deletes: the old output stays published.

Whole-folder stages (train, evaluate) publish by swapping `<workdir>/.<dir>.partial` with
`<workdir>/<dir>`, with `renameat2(RENAME_EXCHANGE)` where the kernel and filesystem offer it
(one atomic step), else two renames; the journal makes either path recoverable.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from regdpo.durable import TMP_MARK, atomic_write_json, fsync_dir, tmp_name, write_synced

log = logging.getLogger(__name__)

JOURNAL_DIR = ".journal"
TOKEN_FILE = ".publish-token"


def _read_token(folder: Path) -> str | None:
    try:
        return (folder / TOKEN_FILE).read_text().strip()
    except OSError:
        return None


# ---- directory exchange ------------------------------------------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_libc = None


def _renameat2():
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        except OSError:
            _libc = False
    fn = getattr(_libc, "renameat2", None) if _libc else None
    return fn


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths; False where the kernel/filesystem cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    res = fn(_AT_FDCWD, os.fsencode(str(a)), _AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE)
    if res == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(a))


# ---- the journal -----------------------------------------------------------------------------


class Transaction:
    """Collects a stage's publish operations, then commits them through a journal.

    - `new_path(dst)`: a temporary path to write a new file to; it replaces `dst` at commit.
    - `move(src, dst)`: an existing file (e.g. in staging) renamed onto `dst` at commit.
    - `delete(path)`: removed at commit (files or folders).
    - `swap(partial, final)`: a whole folder published (see module docstring).
    Paths are stored relative to the workdir, so a journal stays valid if the workdir moves.
    """

    def __init__(self, workdir: Path, name: str):
        self.workdir = Path(workdir)
        self.name = name
        self.ops: list[list[str]] = []
        self._temps: list[Path] = []

    def _rel(self, p: Path) -> str:
        return os.path.relpath(p, self.workdir)

    def new_path(self, dst: Path) -> Path:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_name(dst)
        self._temps.append(tmp)
        self.ops.append(["replace", self._rel(tmp), self._rel(dst)])
        return tmp

    def write_bytes(self, dst: Path, data: bytes) -> None:
        write_synced(self.new_path(dst), data)

    def write_json(self, dst: Path, obj: Any) -> None:
        self.write_bytes(dst, (json.dumps(obj, indent=2) + "\n").encode())

    def move(self, src: Path, dst: Path) -> None:
        self.ops.append(["replace", self._rel(src), self._rel(dst)])

    def delete(self, path: Path) -> None:
        self.ops.append(["delete", self._rel(path)])

    def swap(self, partial: Path, final: Path) -> None:
        token = uuid.uuid4().hex
        (partial / TOKEN_FILE).write_text(token)  # tells a re-applied swap that it already happened
        self.ops.append(["swap", self._rel(partial), self._rel(final), token])

    def abort(self) -> None:
        for tmp in self._temps:
            tmp.unlink(missing_ok=True)

    def commit(self) -> None:
        """Write the journal (the commit point), apply it, remove it."""
        journal = self.workdir / JOURNAL_DIR / f"{self.name}.json"
        # new files must be durable before the journal that points at them
        for d in {t.parent for t in self._temps}:
            fsync_dir(d)
        try:
            atomic_write_json(journal, {"name": self.name, "ops": self.ops})
        except BaseException:
            self.abort()
            raise
        _apply(self.workdir, journal)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _apply(workdir: Path, journal: Path) -> None:
    ops = json.loads(journal.read_text())["ops"]
    for op, *args in ops:
        if op == "replace":
            src, dst = (workdir / a for a in args)
            if src.exists() or src.is_symlink():
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
            # else: applied before an interruption
        elif op == "delete":
            _remove(workdir / args[0])
        elif op == "swap":
            partial, final = workdir / args[0], workdir / args[1]
            token = args[2]
            old = final.with_name(f".{final.name}.old")
            done = _read_token(final) == token  # the new output is already in place
            if partial.exists():
                if done:
                    _remove(partial)  # after an exchange it holds the previous output
                elif final.exists():
                    if exchange(partial, final):
                        _remove(partial)
                    else:
                        _remove(old)
                        os.replace(final, old)
                        os.replace(partial, final)
                else:
                    os.replace(partial, final)
            if old.exists():
                _remove(old)
        else:
            raise ValueError(f"{journal}: unknown journal operation {op!r}")
    fsync_dir(workdir)
    journal.unlink()


def recover(workdir: str | os.PathLike, folders: list[str] = ()) -> list[str]:
    """Complete every committed publish and drop uncommitted temporaries (under `folders`, the
    stage folders); returns what was done.

    Call it while holding the workdir lock (regdpo/stages/lock.py): it renames and deletes.
    """
    workdir = Path(workdir)
    done: list[str] = []
    jdir = workdir / JOURNAL_DIR
    if jdir.is_dir():
        for journal in sorted(jdir.glob("*.json")):
            log.warning("completing the interrupted publish of %s (%s)", journal.stem, journal)
            _apply(workdir, journal)
            done.append(f"completed publish: {journal.stem}")
        for leftover in jdir.glob(f"*{TMP_MARK}*"):
            leftover.unlink(missing_ok=True)
    removed = sum(remove_temporaries(workdir / f) for f in folders)
    if removed:
        done.append(f"removed {removed} temporary files of an interrupted publish")
    return done


def pending_journals(workdir: str | os.PathLike) -> list[str]:
    """Names of publishes committed but not yet applied (for status; applying needs the lock)."""
    jdir = Path(workdir) / JOURNAL_DIR
    return sorted(j.stem for j in jdir.glob("*.json")) if jdir.is_dir() else []


def remove_temporaries(root: Path) -> int:
    """Delete leftover temporary files under `root` (an aborted publish's new files)."""
    count = 0
    if not root.is_dir():
        return 0
    for p in root.rglob(f"*{TMP_MARK}*"):
        _remove(p)
        count += 1
    return count
