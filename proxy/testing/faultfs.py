"""A folder whose file system calls fail as on a read-only file system or a full disk, for tests.

CI runs as root, and root ignores permission bits: ``chmod`` cannot make a folder unwritable for it,
and a read-only mount needs privileges a CI container may not have. So :class:`FailingFolder` patches
the calls that change files, for paths inside one folder only, to raise the ``OSError`` the kernel
would: ``os.open`` for writing or creating (which is how ``tempfile.mkstemp`` and ``filelock``'s lock
files are made), ``os.write`` and ``os.fsync`` on a file of the folder, ``os.replace``, ``os.rename``
and ``os.unlink``. Reads pass. So do writes through the built-in ``open()``: that is how a test plays
a person who edits the file from elsewhere (a host editing a folder the container mounts read-only).

A ``credproxy serve`` process gets it from a ``sitecustomize`` module on its ``PYTHONPATH`` that calls
:func:`install_from_env` (:func:`sitecustomize` writes one); ``switch`` then lets the test turn the
fault on and off from outside (failing while that file exists).
"""

from __future__ import annotations

import errno
import os
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

#: Every call that changes the folder fails: a read-only file system (or a folder we may not write).
READ_ONLY = frozenset({"open", "write", "fsync", "replace", "unlink"})
#: Files can be created, not filled: a full disk (or quota).
FULL = frozenset({"write", "fsync"})
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
ENV_FOLDER = "CREDPROXY_FAULT_FOLDER"
ENV_ERRNO = "CREDPROXY_FAULT_ERRNO"
ENV_CALLS = "CREDPROXY_FAULT_CALLS"
ENV_SWITCH = "CREDPROXY_FAULT_SWITCH"

Patch = Callable[[Any, str, Any], None]


class FailingFolder:
    """Makes changes to ``folder`` fail with ``error`` while :attr:`active` (and ``switch`` exists, if given)."""

    def __init__(
        self, folder: Path, error: int = errno.EROFS, calls: frozenset[str] = READ_ONLY, switch: Path | None = None
    ) -> None:
        self.folder = os.path.realpath(folder) + os.sep
        self.error = error
        self.calls = calls
        self.switch = switch
        self.active = True
        self.failures: Counter[str] = Counter()

    def failing(self, call: str) -> bool:
        return call in self.calls and self.active and (self.switch is None or os.path.exists(self.switch))

    def _inside(self, path: Any) -> bool:
        try:
            return os.path.abspath(os.fsdecode(path)).startswith(self.folder)
        except TypeError:
            return False

    def _fd_inside(self, fd: int) -> bool:
        try:
            return os.readlink(f"/proc/self/fd/{fd}").startswith(self.folder)
        except OSError:
            return False

    def _fail(self, call: str, path: object) -> None:
        self.failures[call] += 1
        raise OSError(self.error, os.strerror(self.error), os.fsdecode(path) if isinstance(path, str | bytes) else None)

    def install(self, patch: Patch = setattr) -> None:
        """Patch ``os`` (``patch`` is ``monkeypatch.setattr`` in a test, so that it is undone after)."""
        real_open, real_write, real_fsync = os.open, os.write, os.fsync
        real_replace, real_rename, real_unlink = os.replace, os.rename, os.unlink

        def open_(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
            if flags & _WRITE_FLAGS and self.failing("open") and self._inside(path):
                self._fail("open", path)
            return real_open(path, flags, mode, dir_fd=dir_fd)

        def write(fd: int, data: Any) -> int:
            if self.failing("write") and self._fd_inside(fd):
                self._fail("write", None)
            return real_write(fd, data)

        def fsync(fd: Any) -> None:
            if self.failing("fsync") and isinstance(fd, int) and self._fd_inside(fd):
                self._fail("fsync", None)
            real_fsync(fd)

        def moving(real: Callable[..., None], call: str) -> Callable[..., None]:
            def move(src: Any, dst: Any, **kwargs: Any) -> None:
                if self.failing(call) and (self._inside(src) or self._inside(dst)):
                    self._fail(call, dst)
                real(src, dst, **kwargs)

            return move

        def unlink(path: Any, **kwargs: Any) -> None:
            if self.failing("unlink") and self._inside(path):
                self._fail("unlink", path)
            real_unlink(path, **kwargs)

        patch(os, "open", open_)
        patch(os, "write", write)
        patch(os, "fsync", fsync)
        patch(os, "replace", moving(real_replace, "replace"))
        patch(os, "rename", moving(real_rename, "replace"))
        patch(os, "unlink", unlink)
        patch(os, "remove", unlink)


def install_from_env(environ: Mapping[str, str] = os.environ) -> FailingFolder | None:
    """Install the fault the environment describes (see :func:`sitecustomize`), if any."""
    folder = environ.get(ENV_FOLDER)
    if not folder:
        return None
    code = getattr(errno, environ.get(ENV_ERRNO, "EROFS"))
    calls = frozenset(environ[ENV_CALLS].split(",")) if environ.get(ENV_CALLS) else READ_ONLY
    switch = Path(environ[ENV_SWITCH]) if environ.get(ENV_SWITCH) else None
    failing = FailingFolder(Path(folder), code, calls, switch)
    failing.install()
    return failing


def sitecustomize(where: Path, folder: Path, error: str, calls: frozenset[str], switch: Path) -> dict[str, str]:
    """Write ``where/sitecustomize.py``; returns the environment that makes a Python process load it."""
    where.mkdir(parents=True, exist_ok=True)
    (where / "sitecustomize.py").write_text("from proxy.testing.faultfs import install_from_env\ninstall_from_env()\n")
    paths = [str(where), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(paths),
        ENV_FOLDER: str(folder),
        ENV_ERRNO: error,
        ENV_CALLS: ",".join(sorted(calls)),
        ENV_SWITCH: str(switch),
    }
