"""Files that hold secrets: refuse to trust loose ones, and create new ones private from the first byte.

A credentials or token file that group or others can read leaks every credential in it; one they can
write lets them swap in their own tokens (or an upstream of their choosing, for the config). One owned
by another user can be changed by that user. Like ssh with a private key, credproxy then refuses to
start and says how to fix it, instead of warning and carrying on.

Root bypasses permission bits, so the checks look at the mode and owner, never at ``os.access``.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from proxy.errors import ConfigError

#: Permission bits that must be clear on a private file (like ssh: no access at all for group and others).
LOOSE_BITS = 0o077


def check_private(path: Path, what: str, st: os.stat_result | None = None) -> None:
    """Raise :class:`ConfigError` unless ``path`` is a regular file owned by us with mode 0600 or stricter.

    ``st`` is the file's stat when the caller already has it open (``os.fstat``), which avoids checking
    one file and reading another. A missing file is not checked here: whoever reads it reports that.
    """
    if st is None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ConfigError(path, "", f"cannot check the {what} ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(path, "", f"the {what} is not a regular file")
    euid = os.geteuid()
    if st.st_uid != euid:
        raise ConfigError(
            path,
            "",
            f"the {what} is owned by uid {st.st_uid}, not by the user running credproxy (uid {euid}), "
            f"who could change it; fix: chown {euid} {path} && chmod 600 {path}",
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & LOOSE_BITS:
        raise ConfigError(
            path,
            "",
            f"the {what} is accessible by group or others (mode {mode:04o}); it holds secrets: fix: chmod 600 {path}",
        )


def create_private(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file ``path``, mode 0600 from the start; refuses to replace an existing file.

    ``O_EXCL`` makes creation atomic (it never follows a planted symlink, never overwrites); the mode is given
    to ``open`` itself, so there is no moment when the file is readable by others, whatever the umask
    (a umask can only remove bits). If writing fails, the partial file is removed.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def read_private(path: Path, what: str, missing_hint: str = "", max_bytes: int = 65536) -> bytes:
    """Read a small private file, checking the permissions of the very file that is read.

    Symbolic links are followed (Docker and Kubernetes secrets are often links); the target is checked.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise ConfigError(path, "", f"the {what} does not exist{missing_hint}") from None
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read the {what} ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as file:
        check_private(path, what, os.fstat(file.fileno()))
        data = file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ConfigError(path, "", f"the {what} is larger than {max_bytes} bytes")
    return data
