"""The credentials file on disk: read under its lock.

This is the only module that touches the credentials file. The lock is a sibling file
(``auth.json.lock``, flock through ``filelock``): ``os.replace`` swaps the data file's inode on every
write, so a lock on the data file itself would protect nothing. Lock waits are bounded and reported
as "locked", never as "no credentials".

Call these functions from a thread (``asyncio.to_thread``) once the event loop runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson
from filelock import FileLock, Timeout

from proxy.credentials import Credential, parse_credentials
from proxy.errors import ConfigError, StoreLocked

LOCK_TIMEOUT = 10.0


def lock_for(path: Path, timeout: float = LOCK_TIMEOUT) -> FileLock:
    """The lock that guards ``path`` against other credproxy processes."""
    return FileLock(str(path) + ".lock", timeout=timeout, thread_local=False)


def parse_document(path: Path, raw: bytes) -> dict[str, Any]:
    """Parse the bytes of a credentials file; errors name the file and position, never the content."""
    if not raw.strip():
        raise ConfigError(path, "", "the credentials file is empty")
    if raw.startswith(b"\xef\xbb\xbf"):
        raise ConfigError(path, "", "the credentials file starts with a byte-order mark; save it as plain UTF-8")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ConfigError(path, "", f"not valid JSON (line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(doc, dict):
        raise ConfigError(path, "", "the credentials file must be a JSON object from provider name to credentials")
    return doc


def read_document(path: Path, lock_timeout: float = LOCK_TIMEOUT) -> dict[str, Any]:
    """Read and parse the credentials file under its lock."""
    try:
        with lock_for(path, lock_timeout):
            raw = path.read_bytes()
    except Timeout:
        raise StoreLocked(f"{path} is locked by another process (waited {lock_timeout:g} s)") from None
    except FileNotFoundError:
        raise ConfigError(path, "", "the credentials file does not exist (see README: 'Credentials file')") from None
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read the credentials file ({exc.strerror or exc})") from None
    return parse_document(path, raw)


def load_credentials(path: Path, providers: Iterable[str]) -> dict[str, tuple[Credential, ...]]:
    """Read the credentials file and return the credentials of the configured ``providers``."""
    return parse_credentials(path, read_document(path), providers)
