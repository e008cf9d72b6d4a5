"""The seam between the proxy and the upstream: one small interface, one boundary for failures.

:class:`Transport` sends one request and returns an :class:`UpstreamResponse` whose body is read
chunk by chunk (or piped, see :meth:`UpstreamResponse.pipe`). Two implement it:
:class:`~proxy.edge.fast_transport.FastTransport` (the default: pooled raw connections parsed by
llhttp) and :class:`~proxy.edge.aiohttp_transport.AiohttpTransport` (aiohttp's client);
:class:`proxy.testing.mock_transport.MockTransport` answers from a script, in memory.

Every failure becomes one of the :mod:`proxy.errors` tree here, with the same words whichever
transport met it, split by what it means for a replay:

* :class:`~proxy.errors.ConnectFailed` (:func:`connect_failed`): the request never left (refused,
  DNS, TLS, connect timeout): safe to try again;
* :class:`~proxy.errors.HeaderTimeout` (:func:`header_timeout`): sent, no response head in time;
* :class:`~proxy.errors.UpstreamReset` (:func:`no_response`, :func:`invalid_response`): sent, and the
  connection ended without a response head, or the head was not valid HTTP or not fit to relay
  (:func:`checked_head`: a status outside 200-599, control characters in the reason phrase or a
  header): a 502 on either server, never relayed;
* :class:`~proxy.errors.StreamBroken` (:func:`stream_broken`): the body broke after the response
  began, or went idle for longer than ``idle_timeout``.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Callable
from typing import Protocol

from proxy.core.headers import Headers, response_head_problem
from proxy.errors import ConnectFailed, HeaderTimeout, RequestRejected, StreamBroken, UpstreamReset


class UpstreamResponse(Protocol):
    status: int
    reason: str
    headers: Headers

    async def read(self) -> bytes:
        """The next chunk of the body as it arrives; ``b""`` at the end. Raises StreamBroken."""
        ...

    def close(self) -> None:
        """Give the response back: reuse the connection when the body was read to the end, else drop it."""
        ...

    def pipe(self, deliver: Deliver) -> asyncio.Future[bytes] | None:
        """Hand the rest of the body to ``deliver`` as it arrives, from the connection's callbacks (no
        task switch per chunk); the future ends with the body, or raises StreamBroken. Its result is
        the body's last bytes, those read together with its end, not delivered: the caller sends them
        with its own end, in one write (the whole body, when it was all buffered already). ``None``:
        this transport cannot, use :meth:`read`. When ``deliver`` returns False the connection stops
        reading until :meth:`resume` is called."""
        ...

    def resume(self) -> None:
        """The client can take more (see :meth:`pipe`)."""
        ...


#: Takes a body chunk; False when the client's buffer is full (see UpstreamResponse.pipe).
Deliver = Callable[[bytes], bool]


class Transport(Protocol):
    async def request(self, method: str, origin: str, target: str, headers: Headers, body: bytes) -> UpstreamResponse:
        """Send one request to ``origin`` (``scheme://host:port``) for the origin-form ``target``."""
        ...

    async def close(self) -> None: ...


def connect_failed(cause: BaseException | None) -> ConnectFailed:
    """Nothing was sent: ``cause`` is the OS, TLS or timeout error met while connecting."""
    if cause is None:
        return ConnectFailed("the upstream closed the connection before the request was sent")
    if isinstance(cause, TimeoutError):
        return ConnectFailed("connecting to the upstream timed out")
    if isinstance(cause, ssl.SSLError):
        return ConnectFailed(f"cannot connect to the upstream: TLS failed ({cause.reason or type(cause).__name__})")
    if isinstance(cause, OSError):  # by its errno: the words of the OS, not those of the library's wrapper
        reason = os.strerror(cause.errno) if cause.errno else cause.strerror or type(cause).__name__
        return ConnectFailed(f"cannot connect to the upstream: {reason}")
    return ConnectFailed(f"cannot connect to the upstream: {type(cause).__name__}")


def header_timeout() -> HeaderTimeout:
    return HeaderTimeout("the upstream sent no response headers in time")


def no_response(cause: str = "") -> UpstreamReset:
    """Sent, and the connection ended before a response head."""
    detail = f": {cause}" if cause else ""
    return UpstreamReset(f"the upstream closed the connection without a response{detail}")


def invalid_response(problem: str) -> UpstreamReset:
    """Sent, and what came back is not a response credproxy relays (never quotes the upstream's bytes)."""
    return UpstreamReset(f"invalid response from the upstream: {problem}")


def stream_broken(cause: str) -> StreamBroken:
    return StreamBroken(f"upstream stream broke: {cause}")


def unsendable() -> RequestRejected:
    """A header value with CR, LF or NUL, or a target that cannot be sent: it would inject headers."""
    return RequestRejected(400, "the request has a header value or path that cannot be forwarded")


def checked_head(status: int, reason: str, headers: Headers) -> None:
    """Raise :func:`invalid_response` for a final head credproxy must not relay (see the module docstring)."""
    problem = response_head_problem(status, reason, headers)
    if problem is not None:
        raise invalid_response(problem)
