"""Store tier: the credentials file on a temp folder, real subprocesses contending for its lock,
``kill -9`` between the steps of a write, and write failures injected by patching the OS calls
(CI runs as root, so ``chmod`` cannot make a file unwritable). reliability.md F21, F27-F32, F35.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.errors import ConfigError, StoreError, StoreLocked
from proxy.storage import files
from tests.conftest import write_json

ROOT = Path(__file__).resolve().parents[2]
OLD = {"openai": [{"type": "api_key", "key": "sk-old-000000001"}, {"type": "api_key", "key": "sk-other-0000002"}]}


def rotate(doc: dict[str, Any]) -> bool:
    doc["openai"][0]["key"] = "sk-new-000000001"
    return True


NEW = {"openai": [{"type": "api_key", "key": "sk-new-000000001"}, {"type": "api_key", "key": "sk-other-0000002"}]}


@pytest.fixture
def creds(tmp_path: Path) -> Path:
    return write_json(tmp_path / "auth.json", OLD)


def no_temp_files(directory: Path) -> bool:
    return not [name for name in os.listdir(directory) if name.endswith(".tmp")]


def test_update_is_a_merged_read_modify_write(creds: Path) -> None:
    """A credential this process never saw (added by someone else) is kept."""
    doc = orjson.loads(creds.read_bytes())
    doc["anthropic"] = {"type": "api_key", "key": "sk-ant-not-ours"}
    write_json(creds, doc)
    files.update_document(creds, rotate)
    after = orjson.loads(creds.read_bytes())
    assert after == {**NEW, "anthropic": {"type": "api_key", "key": "sk-ant-not-ours"}}
    assert os.stat(creds).st_mode & 0o777 == 0o600
    assert no_temp_files(creds.parent)


@pytest.mark.parametrize(
    ("call", "code"),
    [
        ("write", errno.ENOSPC),
        ("write", errno.EIO),
        ("fsync", errno.EIO),
        ("fchmod", errno.EACCES),
        ("replace", errno.EACCES),
        ("mkstemp", errno.ENOSPC),
    ],
)
def test_a_failed_write_leaves_the_original_intact(
    creds: Path, monkeypatch: pytest.MonkeyPatch, call: str, code: int
) -> None:
    """F21, F31, F32: the old file parses with every credential; no temp file is left behind."""
    before = creds.read_bytes()

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise OSError(code, os.strerror(code))

    target = tempfile if call == "mkstemp" else os
    monkeypatch.setattr(target, call, fail)
    with pytest.raises(StoreError) as caught:
        files.update_document(creds, rotate)
    monkeypatch.undo()
    assert errno.errorcode[code] in str(caught.value)
    assert creds.read_bytes() == before
    assert no_temp_files(creds.parent)


@pytest.mark.parametrize("content", [b"", b"{", b"[]", b'{"openai": [{"type": "api_key"', b"\xef\xbb\xbf{}"])
def test_a_corrupt_file_is_never_overwritten(creds: Path, content: bytes) -> None:
    """F27, F28: the error names the file; the file is left exactly as it was."""
    creds.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        files.update_document(creds, rotate)
    assert str(creds) in str(caught.value)
    assert creds.read_bytes() == content


def test_writes_go_to_the_target_of_a_symlink(tmp_path: Path) -> None:
    real = write_json(tmp_path / "real-auth.json", OLD)
    link = tmp_path / "auth.json"
    link.symlink_to(real)
    files.update_document(link, rotate)
    assert link.is_symlink()
    assert orjson.loads(real.read_bytes()) == NEW


HOLDER = """
import sys, time
from proxy.storage import files
lock = files.lock_for(__import__("pathlib").Path(sys.argv[1]))
lock.acquire()
print("locked", flush=True)
time.sleep(600)
"""


@pytest.fixture
def holder(creds: Path) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(creds)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "locked"
    yield process
    process.kill()
    process.wait()


async def test_a_held_lock_is_reported_as_locked_and_never_stalls_the_event_loop(
    creds: Path, holder: subprocess.Popen[str]
) -> None:
    """F29: bounded wait, a message that says "locked", other coroutines keep running meanwhile."""
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        with pytest.raises(StoreLocked, match="locked by another process"):
            await asyncio.to_thread(files.read_document, creds, 0.5)
    finally:
        task.cancel()
    assert ticks >= 10  # the loop kept turning during the half-second wait


def test_a_lock_holder_killed_with_sigkill_releases_the_lock(creds: Path, holder: subprocess.Popen[str]) -> None:
    """F30: flock dies with its process; the leftover .lock file is harmless."""
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    start = time.monotonic()
    assert files.read_document(creds, lock_timeout=5) == OLD
    assert time.monotonic() - start < 4
    assert Path(str(creds) + ".lock").exists()


PAUSER = """
import sys, time, pathlib
from proxy.storage import files
path, step = pathlib.Path(sys.argv[1]), sys.argv[2]
def rotate(doc):
    doc["openai"][0]["key"] = "sk-new-000000001"
    return True
def hook(name):
    if name == step:
        print("paused", flush=True)
        time.sleep(600)
files.update_document(path, rotate, hook=hook)
"""


@pytest.mark.parametrize(("step", "expected"), [("written", OLD), ("synced", OLD), ("replaced", NEW)])
def test_kill_9_at_each_step_of_a_write_leaves_the_old_or_the_new_file(
    creds: Path, step: str, expected: dict[str, Any]
) -> None:
    """F35: after the crash the file is complete, old or new; a restarted reader gets every credential."""
    process = subprocess.Popen(
        [sys.executable, "-c", PAUSER, str(creds), step], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "paused"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert files.read_document(creds, lock_timeout=5) == expected
    from proxy.storage.files import load_credentials

    assert len(load_credentials(creds, ["openai"])["openai"]) == 2
    # A temp file left by the crash is removed by the next writer, whose write succeeds.
    files.update_document(creds, rotate)
    assert orjson.loads(creds.read_bytes()) == NEW
    assert no_temp_files(creds.parent)


def test_a_write_never_loosens_permissions(creds: Path) -> None:
    """A read-only (0400) file stays 0400; anything looser becomes 0600."""
    os.chmod(creds, 0o400)
    files.update_document(creds, rotate)
    assert os.stat(creds).st_mode & 0o777 == 0o400
    os.chmod(creds, 0o644)
    files.update_document(creds, lambda doc: True)
    assert os.stat(creds).st_mode & 0o777 == 0o600
