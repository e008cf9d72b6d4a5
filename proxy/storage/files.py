"""Files credproxy owns on disk: read under a lock, written atomically, merged, never truncated.

This is the only module that opens the credentials file and the state file. Each is guarded by a
sibling lock file (``auth.json.lock``, flock through ``filelock``): ``os.replace`` swaps the data
file's inode on every write, so a lock on the data file itself would protect nothing. Lock waits are
bounded and reported as "locked", never as "no credentials". A lock file that cannot be made at all
(a read-only folder, a full disk, a folder we may not write) is a :class:`StoreError` for a write; a read
then goes ahead without the lock (every credproxy write replaces the file atomically, and a torn
read of someone else's in-place write fails to parse and is reported like any broken edit).

A write is a read-modify-write under the lock (:func:`update_document`): the current file is read and
parsed, the change applied to it (so credentials this process has never seen are kept), and the
result replaced atomically (:func:`atomic_write`: temp file in the same directory, fsync, chmod 0600
(or stricter, if the file was), ``os.replace``, directory fsync). Any failure leaves the original file
intact and raises :class:`StoreError`; a file that no longer parses is never overwritten.

Everything here blocks: call it from a thread (``asyncio.to_thread``) once the event loop runs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson
from filelock import FileLock, Timeout

from proxy.core.credentials import Credential, parse_credentials
from proxy.errors import ConfigError, StoreError, StoreLocked

LOCK_TIMEOUT = 10.0
#: Test hook: called with the name of each step of a write ("written", "synced", "replaced").
WriteHook = Callable[[str], None]


def lock_for(path: Path, timeout: float = LOCK_TIMEOUT) -> FileLock:
    """The lock that guards ``path`` against other credproxy processes."""
    return FileLock(str(path) + ".lock", timeout=timeout, thread_local=False)


def parse_document(path: Path, raw: bytes) -> dict[str, Any]:
    """Parse the bytes of a credentials file; errors name the file and position, never the content."""
    if not raw.strip():
        raise ConfigError(path, "", "the file is empty")
    if raw.startswith(b"\xef\xbb\xbf"):
        raise ConfigError(path, "", "the file starts with a byte-order mark; save it as plain UTF-8")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ConfigError(path, "", f"not valid JSON (line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(doc, dict):
        raise ConfigError(path, "", f"expected a JSON object, not {type(doc).__name__}")
    return doc


def read_document(path: Path, lock_timeout: float = LOCK_TIMEOUT) -> dict[str, Any]:
    """Read and parse the credentials file under its lock (without it, when the lock file cannot be made)."""
    lock = lock_for(path, lock_timeout)
    try:
        lock.acquire()
        locked = True
    except Timeout:
        raise StoreLocked(f"{path} is locked by another process (waited {lock_timeout:g} s)") from None
    except OSError:
        locked = False  # a read-only folder: nobody writing through credproxy can hold this lock either
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(path, "", "the credentials file does not exist (see README: 'Credentials file')") from None
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read the credentials file ({exc.strerror or exc})") from None
    finally:
        if locked:
            _release(lock)
    return parse_document(path, raw)


def _release(lock: FileLock) -> None:
    # Releasing closes the lock file; an error there (EIO) changes nothing for the data read or written.
    with contextlib.suppress(OSError):
        lock.release()


def load_credentials(
    path: Path, providers: Iterable[str], kinds: Mapping[str, str] | None = None
) -> dict[str, tuple[Credential, ...]]:
    """Read the credentials file and return the credentials of the configured ``providers`` (of ``kinds``)."""
    return parse_credentials(path, read_document(path), providers, kinds)


def atomic_write(path: Path, data: bytes, hook: WriteHook | None = None) -> None:
    """Replace ``path`` with ``data`` atomically, mode 0600; on any error the old file stays intact."""
    target = path.resolve()  # write next to the real file when the path is a symlink
    directory = target.parent
    mode = _private_mode(target)
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise StoreError(f"cannot write {path}: {describe(exc)}") from None
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if hook:
                hook("written")
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        if hook:
            hook("synced")
        os.replace(tmp, target)
        if hook:
            hook("replaced")
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise StoreError(f"cannot write {path}: {describe(exc)}") from None
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        # The new file is in place; only its durability across a power cut is in doubt.
        raise StoreError(f"wrote {path} but could not sync its directory: {describe(exc)}") from None


def _private_mode(target: Path) -> int:
    """0600, or the existing file's mode when it is stricter (a 0400 file stays 0400): never loosened."""
    try:
        existing = stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        return 0o600
    mode = existing & 0o600
    return mode if mode & 0o400 else 0o600


def describe(exc: OSError) -> str:
    """An OSError as a person reads it: 'Read-only file system (EROFS)' (never its file's content)."""
    name = errno.errorcode.get(exc.errno or 0, "")
    return f"{exc.strerror or exc} ({name})" if name else str(exc.strerror or exc)


def _remove_stray_temp_files(path: Path) -> None:
    """Temp files of a writer that crashed. Writers hold the lock while their temp file exists, so any
    temp file seen by the lock holder is a leftover."""
    target = path.resolve()
    for stray in target.parent.glob(f".{target.name}.*.tmp"):
        with contextlib.suppress(OSError):
            stray.unlink()


def update_document(
    path: Path,
    change: Callable[[dict[str, Any]], bool],
    *,
    missing_ok: bool = False,
    lock_timeout: float = LOCK_TIMEOUT,
    hook: WriteHook | None = None,
) -> dict[str, Any]:
    """Read-modify-write ``path`` under its lock; ``change`` edits the document and says whether it changed it.

    Returns the document as written (or as read, when nothing changed). A file that does not parse is
    left alone and raises :class:`ConfigError`; a missing file is an empty document when ``missing_ok``.
    """
    lock = lock_for(path, lock_timeout)
    try:
        lock.acquire()
    except Timeout:
        raise StoreLocked(f"{path} is locked by another process (waited {lock_timeout:g} s)") from None
    except OSError as exc:
        raise StoreError(f"cannot lock {path}: {describe(exc)}") from None
    try:
        _remove_stray_temp_files(path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            if not missing_ok:
                raise ConfigError(path, "", "the file does not exist") from None
            raw = b"{}"
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {describe(exc)}") from None
        doc = parse_document(path, raw) if raw.strip() or not missing_ok else {}
        if change(doc):
            atomic_write(path, orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n", hook)
        return doc
    finally:
        _release(lock)
