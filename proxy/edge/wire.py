"""Response bytes as the servers write them: the status line and headers, the ``Date`` value, whole
proxy-made answers. One writer for relayed and proxy-made responses, so both look alike on the wire."""

from __future__ import annotations

import time
from collections.abc import Iterable
from email.utils import formatdate
from http import HTTPStatus
from typing import cast

from aiohttp import web

#: Response headers the server writes itself.
_OWN_HEADERS = frozenset({"date", "connection"})


class HttpDate:
    """The ``Date`` header value, formatted once per second."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = ""

    def __call__(self) -> str:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = formatdate(now, usegmt=True)
        return self._value


def response_head(
    status: int, reason: str, headers: Iterable[tuple[str, str]], date: str, close: bool, extra: str
) -> bytes:
    """A response head: ``headers`` (less ``Date`` and ``Connection``), ``Date``, ``extra`` (framing
    lines) and ``Connection: close`` when the connection ends after it. Values go out in UTF-8 with
    surrogates escaped, as they were decoded (and as aiohttp writes them)."""
    lines = [f"HTTP/1.1 {status} {reason or reason_phrase(status)}\r\n"]
    lines += [f"{name}: {value}\r\n" for name, value in headers if name.lower() not in _OWN_HEADERS]
    lines.append(f"Date: {date}\r\n{extra}")
    if close:
        lines.append("Connection: close\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape")


def serialize(response: web.Response, date: str, close: bool, head_only: bool = False) -> bytes:
    """A whole proxy-made response (a JSON answer) as bytes; ``head_only`` for a HEAD request."""
    body = cast(bytes, response.body or b"")
    headers = ((k, v) for k, v in response.headers.items() if k.lower() != "content-length")
    head = response_head(response.status, response.reason, headers, date, close, f"Content-Length: {len(body)}\r\n")
    return head if head_only else head + body


def reason_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""
