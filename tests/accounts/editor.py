"""A person editing the credentials file by hand, the three ways editors save (for the custody tests).

``locked`` takes credproxy's lock (``auth.json.lock``) and replaces the file atomically, as ``credproxy
import`` and a careful tool do; ``rename`` writes a temp file and renames it over the original without
the lock (vim, most editors); ``truncate`` truncates the file in place and writes the new content (Codex
CLI's file backend, ``echo > auth.json``). None of them knows about rotated tokens: whatever copy the
person read earlier is what they save.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Any

import orjson

from proxy.storage import files

MODES = ("locked", "rename", "truncate")


def save(path: Path, doc: dict[str, Any], mode: str) -> None:
    data = orjson.dumps(doc, option=orjson.OPT_INDENT_2)
    if mode == "locked":
        with files.lock_for(path):
            _rename(path, data)
    elif mode == "rename":
        _rename(path, data)
    elif mode == "truncate":
        with open(path, "r+b") as handle:
            handle.truncate(0)
            handle.write(data)
    else:
        raise ValueError(mode)


def _rename(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.editor-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = orjson.loads(path.read_bytes())
    return doc


def oauth_entries(doc: dict[str, Any], provider: str = "openai-codex") -> list[dict[str, Any]]:
    value = doc.get(provider, [])
    return value if isinstance(value, list) else [value]


async def think(stop: asyncio.Event, seconds: float) -> bool:
    """The person takes ``seconds`` over their copy; False when ``stop`` is set meanwhile (they leave
    without saving, at once: the test need not wait out their pause)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()
    return not stop.is_set()
