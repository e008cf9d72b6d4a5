"""The seam between the proxy and the network: one small interface, one boundary for exceptions.

:class:`Transport` sends one request and returns an :class:`UpstreamResponse` whose body is read
chunk by chunk. Every network failure is translated here, and only here, into the
:mod:`proxy.errors` tree, split by what it means for a replay:

* :class:`~proxy.errors.ConnectFailed`: the request never left (refused, DNS, TLS, connect timeout);
* :class:`~proxy.errors.HeaderTimeout`: sent, no response headers within ``header_timeout``;
* :class:`~proxy.errors.UpstreamReset`: sent, the connection died before a response;
* :class:`~proxy.errors.StreamBroken`: the body broke after the response began, or went idle for
  longer than ``idle_timeout``.

:class:`AiohttpTransport` is the general implementation on one ``aiohttp.ClientSession``: keep-alive
pool, no cookie jar (an account's cookies must not follow the next account), no redirects, no
environment proxies, no decompression (bytes and ``Content-Encoding`` pass through), no total timeout
(a long stream that keeps progressing is never cut), an idle read timeout instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

import aiohttp
from yarl import URL

from proxy.config import Limits
from proxy.core.headers import Headers
from proxy.errors import ConnectFailed, HeaderTimeout, RequestRejected, StreamBroken, UpstreamReset

# aiohttp would add these when absent; the upstream should see what the client sent.
_SKIP_AUTO_HEADERS = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})


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


class _AiohttpResponse:
    __slots__ = ("_response", "headers", "reason", "status")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.reason = response.reason or ""
        self.headers: Headers = list(response.headers.items())

    async def read(self) -> bytes:
        try:
            return await self._response.content.readany()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise StreamBroken(f"upstream stream broke: {type(exc).__name__}") from None

    def close(self) -> None:
        if self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()

    def pipe(self, deliver: Deliver) -> None:
        return None

    def resume(self) -> None:
        return None


class AiohttpTransport:
    """A :class:`Transport` on one ``aiohttp.ClientSession`` with keep-alive to the upstream."""

    def __init__(self, limits: Limits, pool_size: int = 1000) -> None:
        self._header_timeout = limits.header_timeout
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=pool_size, limit_per_host=0, ttl_dns_cache=300),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            trust_env=False,
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=limits.connect_timeout, sock_read=limits.idle_timeout
            ),
            skip_auto_headers=_SKIP_AUTO_HEADERS,
        )

    async def request(self, method: str, origin: str, target: str, headers: Headers, body: bytes) -> UpstreamResponse:
        url = URL(origin + target, encoded=True)
        try:
            async with asyncio.timeout(self._header_timeout):
                response = await self._session.request(
                    method, url, headers=headers, data=body or None, allow_redirects=False, compress=None
                )
        except aiohttp.ClientConnectorError as exc:
            raise ConnectFailed(f"cannot connect to the upstream: {_reason(exc)}") from None
        except aiohttp.ConnectionTimeoutError:
            raise ConnectFailed("connecting to the upstream timed out") from None
        except TimeoutError:
            raise HeaderTimeout("the upstream sent no response headers in time") from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, aiohttp.ClientResponseError) as exc:
            raise UpstreamReset(
                f"the upstream closed the connection without a response: {type(exc).__name__}"
            ) from None
        except ValueError:
            # aiohttp refuses header values with CR/LF (header injection) or an unusable URL.
            raise RequestRejected(400, "the request has a header value or path that cannot be forwarded") from None
        return _AiohttpResponse(response)

    async def close(self) -> None:
        await self._session.close()


def _reason(exc: aiohttp.ClientConnectorError) -> str:
    os_error = exc.os_error
    return os_error.strerror or type(os_error).__name__ if os_error else type(exc).__name__
