"""Upstream sockets of the Responses WebSocket bridge: aiohttp's WebSocket client, one boundary for its errors.

:class:`UpstreamSockets` owns one ``aiohttp.ClientSession`` for the bridge (created and closed with the
application) and opens one upstream socket per call: no cookie jar (an account's cookies must not follow
the next account), no environment proxies, TLS verified, a handshake bounded by
``limits.connect_timeout`` (connecting) and ``limits.header_timeout`` (the answer). Pings, pongs and
closes are not answered by aiohttp (``autoping`` and ``autoclose`` off): the bridge relays them.
Text frames are handed over as bytes (``decode_text=False``): they are relayed, not read as text.

A refused upgrade is an HTTP answer like any other, and credproxy classifies it like one (a ``429``
with ``usage_limit_reached`` and ``resets_at`` in its body blocks the credential until then). aiohttp's
``ws_connect`` raises at a refusal and drops the body, so a client middleware reads the body of any
answer other than ``101`` (bounded) before it does, and raises :class:`UpgradeRefused` with it; a
redirect is such an answer too, and is never followed. Every other failure is translated here, and only
here, into the :mod:`proxy.errors` tree.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from contextvars import ContextVar
from typing import Literal, TypeAlias

import aiohttp
from yarl import URL

from proxy.config import Limits
from proxy.core.headers import Headers
from proxy.errors import ConnectFailed, HeaderTimeout, RequestRejected, UpstreamReset

# aiohttp would add these when absent; the upstream should see what the client sent.
_SKIP_AUTO_HEADERS = frozenset({"User-Agent", "Accept", "Accept-Encoding"})
#: Bytes of a refused upgrade's body read to classify it (as for an HTTP error body).
MAX_REFUSAL_BODY = 256 * 1024
#: Seconds a close waits for the other side's close frame (Codex never sends one: it drops the connection).
CLOSE_TIMEOUT = 2.0


#: An upstream socket: text frames come as bytes (``decode_text=False``).
UpstreamSocket: TypeAlias = aiohttp.ClientWebSocketResponse[Literal[False]]


class UpgradeRefused(Exception):
    """The upstream answered the upgrade with ``status`` (not 101); ``body``: its first bytes, ``complete``
    when that was all of it."""

    def __init__(self, status: int, reason: str, headers: Headers, body: bytes, complete: bool) -> None:
        super().__init__(f"the upstream refused the WebSocket upgrade with {status}")
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body
        self.complete = complete


#: Where the middleware puts the 101's headers for :meth:`UpstreamSockets.open` (``ws_connect`` keeps them).
_ANSWER: ContextVar[list[Headers] | None] = ContextVar("upgrade_answer", default=None)


async def _read_answer(request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType) -> aiohttp.ClientResponse:
    """A client middleware: the headers of a 101 are kept; any other answer becomes :class:`UpgradeRefused`."""
    response = await handler(request)
    if response.status == 101:
        answer = _ANSWER.get()
        if answer is not None:
            answer.append(list(response.headers.items()))
        return response
    body, complete = b"", False
    try:
        while len(body) < MAX_REFUSAL_BODY:
            chunk = await response.content.read(MAX_REFUSAL_BODY - len(body))
            if not chunk:
                complete = True
                break
            body += chunk
    except (aiohttp.ClientError, TimeoutError):
        complete = False
    finally:
        response.close()
    raise UpgradeRefused(response.status, response.reason or "", list(response.headers.items()), body, complete)


class UpstreamSockets:
    """Opens upstream WebSockets (module docstring); :meth:`close` when the application stops."""

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=limits.connect_timeout),
            middlewares=(_read_answer,),
            skip_auto_headers=_SKIP_AUTO_HEADERS,
        )

    async def open(
        self, url: URL, headers: Headers, *, compress: bool, protocols: Sequence[str] = ()
    ) -> tuple[UpstreamSocket, Headers]:
        """A socket to ``url`` sent with ``headers`` (permessage-deflate offered when ``compress``), and
        the headers of its 101.

        Raises :class:`UpgradeRefused`, :class:`~proxy.errors.ConnectFailed` (never left),
        :class:`~proxy.errors.HeaderTimeout` or :class:`~proxy.errors.UpstreamReset`.
        """
        answer: list[Headers] = []
        token = _ANSWER.set(answer)
        try:
            async with asyncio.timeout(self._limits.header_timeout):
                ws = await self._session.ws_connect(
                    url,
                    headers=headers,
                    protocols=protocols,
                    compress=15 if compress else 0,
                    autoping=False,
                    autoclose=False,
                    max_msg_size=self._limits.websocket_max_message_bytes,
                    decode_text=False,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_TIMEOUT),
                )
            return ws, answer[0] if answer else []
        except aiohttp.ClientConnectorError as exc:
            os_error = exc.os_error
            reason = (os_error.strerror or type(os_error).__name__) if os_error else type(exc).__name__
            raise ConnectFailed(f"cannot connect to the upstream: {reason}") from None
        except aiohttp.ConnectionTimeoutError:
            raise ConnectFailed("connecting to the upstream timed out") from None
        except TimeoutError:
            raise HeaderTimeout("the upstream did not answer the WebSocket upgrade in time") from None
        except aiohttp.WSServerHandshakeError as exc:  # a 101 that is not a valid WebSocket handshake
            raise UpstreamReset(f"the upstream's WebSocket handshake was invalid: {exc.message}") from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, aiohttp.ClientResponseError) as exc:
            raise UpstreamReset(
                f"the upstream closed the connection during the upgrade: {type(exc).__name__}"
            ) from None
        except ValueError:
            raise RequestRejected(400, "the request has a header value or path that cannot be forwarded") from None
        finally:
            _ANSWER.reset(token)

    async def close(self) -> None:
        await self._session.close()
