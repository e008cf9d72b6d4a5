"""The upstream :class:`~proxy.edge.transport.Transport` on aiohttp's client (``"transport": "aiohttp"``).

One ``aiohttp.ClientSession``: no cookie jar (an account's cookies must not follow the next
account), no redirects, no environment proxies, no decompression (bytes and ``Content-Encoding`` pass
through), no total timeout (a long stream that keeps progressing is never cut), an idle read timeout
instead. aiohttp's exceptions become the seam's failures here, with the words of
:mod:`proxy.edge.transport`.

**One connection per request** (``force_close``). aiohttp's client keeps parsing what arrives on a
pooled connection after a response, and its public API cannot say that bytes came beyond the
response: a stray response from the upstream, or part of one, would be read as the answer to the
next request on that connection, another client's (issue 16, tests/e2e/test_bad_upstream.py). The
default transport (:mod:`proxy.edge.fast_transport`) sees every byte and keeps connections alive
safely; this one pays a connection per request for the same guarantee.
"""

from __future__ import annotations

import asyncio

import aiohttp
from yarl import URL

from proxy.config import Limits
from proxy.core.headers import Headers
from proxy.edge.transport import (
    Deliver,
    UpstreamResponse,
    checked_head,
    connect_failed,
    header_timeout,
    invalid_response,
    no_response,
    stream_broken,
    unsendable,
)

# aiohttp would add these when absent; the upstream should see what the client sent.
_SKIP_AUTO_HEADERS = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})


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
            raise stream_broken(type(exc).__name__) from None

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
    """A :class:`~proxy.edge.transport.Transport` on one ``aiohttp.ClientSession`` with keep-alive."""

    def __init__(self, limits: Limits, pool_size: int = 1000) -> None:
        self._header_timeout = limits.header_timeout
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=pool_size, limit_per_host=0, ttl_dns_cache=300, force_close=True),
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
            raise connect_failed(exc.os_error) from None
        except aiohttp.ConnectionTimeoutError:
            raise connect_failed(TimeoutError()) from None
        except TimeoutError:
            raise header_timeout() from None
        except aiohttp.ClientResponseError as exc:
            raise invalid_response(type(exc).__name__) from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise no_response(type(exc).__name__) from None
        except ValueError:
            raise unsendable() from None  # aiohttp refuses header values with CR/LF, or an unusable URL
        answer = _AiohttpResponse(response)
        try:
            checked_head(answer.status, answer.reason, answer.headers)
        except BaseException:
            response.close()
            raise
        return answer

    async def close(self) -> None:
        await self._session.close()
