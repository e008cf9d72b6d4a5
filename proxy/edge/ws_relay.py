"""One bridged client socket: frames both ways, the plan's commands carried out.

A :class:`Relay` owns a client socket (aiohttp's server side) and at most one upstream socket at a
time (aiohttp's client side). Two loops read: the client's in the handler's task, the upstream's in a
task of its own (a new one for each upstream socket). Each frame is handed to the
:class:`~proxy.core.wsplan.SocketPlan` and the commands it answers are carried out at once, in order,
under one lock, so that the plan sees one event at a time and what it orders is sent in that order
(while a failover opens the next socket, the client's next frames wait for it).

Frames are relayed one by one as they arrive, never merged or reordered: a text frame as a text frame
(its bytes, not decoded), a binary one as binary (outside the plan: the protocol has none), pings and
pongs to the other side, a close to the other side with its code and reason. The only frames the
bridge writes itself are the usage-limit frame (every credential limited) and the closes of
:mod:`proxy.core.wsplan`. An error frame is masked like an error body (an upstream may echo a key).

The socket ends when either side closes, after ``limits.websocket_idle_timeout`` with no frame either
way, or at shutdown (:meth:`Relay.drain`: at once when no response is in flight, else when it ends,
and never later than ``limits.shutdown_grace``). Closing never blocks a credential.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Sequence
from typing import Protocol

import aiohttp
from aiohttp import WSMsgType, web

from proxy.core import wsframes
from proxy.core.clock import Clock
from proxy.core.credentials import Credential
from proxy.core.replay import Block
from proxy.core.secret import redact_bytes
from proxy.core.selection import fnv1a_utf16
from proxy.core.wsplan import (
    CloseClient,
    CloseUpstream,
    Command,
    Commands,
    Connect,
    Ended,
    Exhausted,
    Forward,
    Phase,
    SocketPlan,
    client_close,
)
from proxy.core.wsplan import (
    Relay as RelayFrames,
)
from proxy.edge.ws_open import Link, Opened
from proxy.edge.ws_upstream import CLOSE_TIMEOUT, UpgradeRefused, UpstreamSocket
from proxy.errors import NoCredentialAvailable, UpstreamError
from proxy.observe.record import RequestRecord

log = logging.getLogger("credproxy")

#: The close code of a message over the size cap (aiohttp closes with it).
TOO_BIG = 1009
#: Code and reason of credproxy's own closes.
IDLE = (1001, "credproxy: idle timeout")
SHUTDOWN = (1001, "credproxy is shutting down")
GONE = (1001, "credproxy: the client went away")


class Relay:
    """One bridged client socket (module docstring)."""

    def __init__(
        self, bridge: Host, link: Link, client: web.WebSocketResponse, plan: SocketPlan, opened: Opened | None
    ) -> None:
        self.bridge = bridge
        self.link = link
        self.provider = link.provider
        self.record = link.record
        self.plan = plan
        self.outcome = ""
        self._client = client
        self._upstream = opened.ws if opened is not None else None
        self._pump: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._loop = asyncio.get_running_loop()
        self._last = self._loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._closing = False  # credproxy closes the client (its receive loop ends quietly)
        self._draining = False
        self._session_known = link.session_id is not None
        self._responses: deque[RequestRecord] = deque()
        self._count = 0
        self._background: set[asyncio.Task[object]] = set()
        self.used: list[str] = [] if opened is None else [opened.cred.label]

    @property
    def cred(self) -> Credential | None:
        return self.plan.cred

    async def run(self) -> None:
        """Relay until the socket ends; every socket is closed when this returns (or is cancelled)."""
        self._timer = self._loop.call_later(self.bridge.idle_timeout, self._check_idle)
        if self._upstream is not None:
            self._start_pump(self._upstream)
        try:
            await self._client_loop()
        finally:
            for handle in (self._timer, self._deadline):
                if handle is not None:
                    handle.cancel()
            await self._finish()

    # Reading ---------------------------------------------------------------------------------

    async def _client_loop(self) -> None:
        client = self._client
        while True:
            msg = await client.receive()
            self._last = self._loop.time()
            kind = msg.type
            if kind is WSMsgType.TEXT:
                await self._client_text(msg.data)
            elif kind is WSMsgType.BINARY:
                upstream = self._upstream
                if upstream is not None:
                    await self._send_upstream(upstream, msg.data, WSMsgType.BINARY)
            elif kind is WSMsgType.PING:
                if self._upstream is not None:
                    await self._send_upstream(self._upstream, msg.data, WSMsgType.PING)
                else:
                    await client.pong(msg.data)
            elif kind is WSMsgType.PONG:
                if self._upstream is not None:
                    await self._send_upstream(self._upstream, msg.data, WSMsgType.PONG)
            elif kind is WSMsgType.CLOSE:
                code, reason = client_close(msg.data or 1005, msg.extra or "")
                async with self._lock:
                    self.outcome = self.outcome or "client_closed"
                    await self._run(self.plan.client_closed(code, reason))
                    self._closing = True
                    await client.close(code=code, message=reason.encode()[:123])
                return
            else:  # CLOSING: credproxy closed it; CLOSED or ERROR: the client went away, or broke the protocol
                if not self._closing:
                    async with self._lock:
                        if _too_big(msg.data):
                            self.outcome = self.outcome or "message_too_big"
                            reason = "credproxy: the client sent a message over limits.websocket_max_message_bytes"
                            await self._run(self.plan.client_closed(1001, reason))
                        else:
                            self.outcome = self.outcome or "client_gone"
                            await self._run(self.plan.client_closed(*GONE, 499, "client_gone"))
                return

    async def _client_text(self, data: bytes) -> None:
        kind = wsframes.frame_type(data)
        doc = wsframes.parse(data) if kind is None or kind == wsframes.CREATE else None
        if kind is None and doc is not None:
            kind = wsframes.type_of(doc)
        async with self._lock:
            if kind == wsframes.CREATE and doc is not None:
                self._started(doc)
                cred = self.plan.cred
                usable = cred is None or self.bridge.available(cred)
                commands = self.plan.request(doc, data, usable)
            else:
                commands = self.plan.other(data)
            await self._run(commands)

    def _start_pump(self, ws: UpstreamSocket) -> None:
        self._pump = self._loop.create_task(self._upstream_loop(ws))

    async def _upstream_loop(self, ws: UpstreamSocket) -> None:
        bridge, plan = self.bridge, self.plan
        send, text = self._client.send_frame, WSMsgType.TEXT
        parsed, awaiting = wsframes.PARSED, Phase.AWAITING
        while True:
            msg = await ws.receive()
            if ws is not self._upstream:
                return  # detached (a failover, or credproxy closed it)
            self._last = self._loop.time()
            kind = msg.type
            if kind is WSMsgType.TEXT:
                data: bytes = msg.data
                name = wsframes.frame_type(data)
                if name is not None and name not in parsed and plan.phase is not awaiting:
                    # Most frames: a delta while the response streams. The plan's table relays it as it is
                    # (SocketPlan.relays_unread), so it goes without the plan, the lock or a parse.
                    try:  # noqa: SIM105 (suppress() costs an object per frame)
                        await send(data, text)
                    except ConnectionError:
                        pass  # the client is gone: its receive loop ends the socket
                    continue
                doc = None
                if name is None:
                    doc = wsframes.parse(data)
                    name = wsframes.type_of(doc) if doc is not None else ""
                elif name in wsframes.PARSED:
                    doc = wsframes.parse(data)
                cred = self.plan.cred
                assert cred is not None
                if name == wsframes.RATE_LIMITS:
                    bridge.usage_events(cred, data)
                elif name == wsframes.ERROR and doc is not None:
                    bridge.usage_headers(cred, wsframes.frame_headers(doc))
                    data = redact_bytes(data, bridge.secrets())
                async with self._lock:
                    if ws is not self._upstream:
                        return
                    now = bridge.clock.time()
                    await self._run(self.plan.frame(data, name, doc, now, bridge.consecutive(cred)))
            elif kind is WSMsgType.BINARY:
                await self._send_client(msg.data, WSMsgType.BINARY)
            elif kind is WSMsgType.PING:
                await self._send_client(msg.data, WSMsgType.PING)
            elif kind is WSMsgType.PONG:
                await self._send_client(msg.data, WSMsgType.PONG)
            else:  # CLOSE, or the connection ended without one (CLOSING, CLOSED, ERROR: 1009 for a message too big)
                code = msg.data if kind is WSMsgType.CLOSE and msg.data else 1006
                reason = msg.extra if kind is WSMsgType.CLOSE and isinstance(msg.extra, str) else ""
                if _too_big(msg.data):
                    code, reason = (
                        TOO_BIG,
                        "credproxy: the upstream sent a message over limits.websocket_max_message_bytes",
                    )
                async with self._lock:
                    if ws is not self._upstream:
                        return
                    self._upstream = None
                    self._later(ws.close())  # answer its close (or let go of the connection)
                    self.outcome = self.outcome or "upstream_closed"
                    await self._run(self.plan.upstream_closed(code, reason))
                return

    # Commands --------------------------------------------------------------------------------

    async def _run(self, commands: Commands) -> None:
        for command in commands:
            await self._carry_out(command)

    async def _carry_out(self, command: Command) -> None:
        kind = type(command)
        if kind is RelayFrames:
            assert isinstance(command, RelayFrames)
            for data in command.frames:
                await self._send_client(data, WSMsgType.TEXT)
        elif kind is Forward:
            assert isinstance(command, Forward)
            if self._upstream is not None:
                await self._send_upstream(self._upstream, command.data, WSMsgType.TEXT)
        elif kind is Ended:
            assert isinstance(command, Ended)
            self._ended(command)
        elif kind is Block:
            assert isinstance(command, Block)
            self.bridge.carry_out((command,), self.record.request_id)
        elif kind is Connect:
            assert isinstance(command, Connect)
            await self._run(await self._connect(command.exclude))
        elif kind is CloseUpstream:
            assert isinstance(command, CloseUpstream)
            ws, self._upstream = self._upstream, None
            if ws is not None:
                code, reason = client_close(command.code, command.reason)
                self._later(ws.close(code=code, message=reason.encode()[:123]))
        elif kind is CloseClient:
            assert isinstance(command, CloseClient)
            self._closing = True
            await self._client.close(code=command.code, message=command.reason.encode()[:123])
        elif kind is Exhausted:
            exc = self.bridge.unavailable(self.provider.name)
            frame = wsframes.exhausted_frame(self.provider.kind, exc.retry_at, self.bridge.clock.time(), str(exc))
            await self._send_client(frame, WSMsgType.TEXT)

    async def _connect(self, exclude: frozenset[str]) -> Commands:
        tried: list[Credential] = []
        try:
            opened = await self.bridge.open_upstream(self.link, exclude, tried)
        except NoCredentialAvailable as exc:
            return self.plan.exhausted(exc.status, tried)
        except (UpgradeRefused, UpstreamError) as exc:  # the client reconnects (and meets it, if it lasts)
            log.info("socket %s: no upstream socket: %s", self.record.request_id, exc)
            return self.plan.connect_failed(tried)
        self._upstream = opened.ws
        if opened.cred.label in self.used:
            self.used.remove(opened.cred.label)
        self.used.append(opened.cred.label)
        self._start_pump(opened.ws)
        return self.plan.connected(opened.cred, opened.tried)

    async def _send_client(self, data: bytes, opcode: WSMsgType) -> None:
        try:
            if opcode is WSMsgType.PING:
                await self._client.ping(data)
            elif opcode is WSMsgType.PONG:
                await self._client.pong(data)
            else:
                await self._client.send_frame(data, opcode)
        except ConnectionError:
            pass  # the client is gone: its receive loop sees it and ends the socket

    async def _send_upstream(self, ws: UpstreamSocket, data: bytes, opcode: WSMsgType) -> None:
        try:
            if opcode is WSMsgType.PING:
                await ws.ping(data)
            elif opcode is WSMsgType.PONG:
                await ws.pong(data)
            else:
                await ws.send_frame(data, opcode)
        except (ConnectionError, aiohttp.ClientError):
            pass  # the upstream is gone: its receive loop sees it and passes the close on

    # Records ---------------------------------------------------------------------------------

    def _started(self, doc: dict[str, object]) -> None:
        """A response.create: its record starts; the first one names the session when the handshake did not."""
        if not self._session_known:
            self._session_known = True
            key = doc.get("prompt_cache_key")
            if isinstance(key, str) and key.strip() and len(key) <= self.bridge.max_session_id_length:
                self.link.session_id = key.strip()
                self.record.session_hash = f"{fnv1a_utf16(self.link.session_id):08x}"
        self._count += 1
        record = RequestRecord(
            request_id=f"{self.record.request_id}.{self._count}",
            method="WS",
            path=self.record.path,
            provider=self.record.provider,
            session_hash=self.record.session_hash,
            started=self.bridge.clock.time(),
        )
        record.duration = self.bridge.clock.monotonic()  # the start, until it ends
        self._responses.append(record)

    def _ended(self, ended: Ended) -> None:
        record = self._responses.popleft() if self._responses else None
        if ended.cred is not None:
            if ended.outcome == "served":
                self.bridge.succeeded(ended.cred, self.link.session_id)
            elif ended.outcome == "upstream_status":
                self.bridge.failed(ended.cred, ended.reason)
        if record is not None:
            record.status = ended.status
            record.outcome = ended.outcome
            record.tried = [c.label for c in ended.tried]
            record.attempts = ended.attempts
            record.error = ended.reason
            record.duration = self.bridge.clock.monotonic() - record.duration
            self.bridge.observe(record)
        if self._draining and not self._responses and not self._closing:
            self._later(self._shut(*SHUTDOWN, "shutdown"))

    # Ending ----------------------------------------------------------------------------------

    def drain(self, grace: float) -> None:
        """Shutdown: close now when no response is in flight, else when it ends, and in ``grace`` s at most."""
        self._draining = True
        if not self._responses:
            self._later(self._shut(*SHUTDOWN, "shutdown"))
        self._deadline = self._loop.call_later(grace, lambda: self._later(self._shut(*SHUTDOWN, "shutdown")))

    def _check_idle(self) -> None:
        left = self._last + self.bridge.idle_timeout - self._loop.time()
        if left > 0:
            self._timer = self._loop.call_later(left, self._check_idle)
            return
        self._later(self._shut(*IDLE, "idle_timeout"))

    async def _shut(self, code: int, reason: str, outcome: str) -> None:
        """credproxy ends the socket: a response in flight ends with it (503), the client gets ``code``."""
        async with self._lock:
            if self._closing:
                return
            self.outcome = self.outcome or outcome
            await self._run(self.plan.client_closed(code, reason, 503, outcome))
            self._closing = True
            await self._client.close(code=code, message=reason.encode())

    def _later(self, work: Awaitable[object]) -> None:
        task: asyncio.Task[object] = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _finish(self) -> None:
        """Close whatever is still open, briefly: a peer that never answers a close is cut.

        After a cancellation (the client's connection went away, or ``shutdown_grace`` passed) responses
        may still be in flight: the plan ends them as a close would, and they are logged so (499, or 503
        at shutdown); nothing is blocked."""
        self._closing = True  # from here on nothing else closes the client (no _shut)
        pump, self._pump = self._pump, None
        if pump is not None and not pump.done():
            pump.cancel()
        code, reason = SHUTDOWN if self._draining else GONE
        if self._responses:
            status, outcome = (503, "shutdown") if self._draining else (499, "client_gone")
            self.outcome = self.outcome or outcome
            for command in self.plan.client_closed(code, reason, status, outcome):
                if type(command) is Ended:
                    self._ended(command)
        upstream, self._upstream = self._upstream, None
        closing: list[asyncio.Future[object]] = [t for t in self._background if not t.done()]
        if upstream is not None:
            closing.append(asyncio.ensure_future(upstream.close(code=code, message=reason.encode())))
        if not self._client.closed:
            closing.append(asyncio.ensure_future(self._client.close(code=code, message=reason.encode())))
        waiting = [t for t in (pump, *closing) if t is not None]
        if waiting:
            await asyncio.wait(waiting, timeout=CLOSE_TIMEOUT)
            for task in waiting:
                if not task.done():
                    task.cancel()


def _too_big(error: object) -> bool:
    """An ERROR message of aiohttp's for a message over ``max_msg_size``."""
    return isinstance(error, aiohttp.WebSocketError) and error.code == TOO_BIG


class Host(Protocol):
    """What a :class:`Relay` needs of its bridge (:class:`proxy.edge.websocket.Bridge` is one)."""

    clock: Clock
    idle_timeout: float
    max_session_id_length: int

    async def open_upstream(self, link: Link, exclude: frozenset[str], tried: list[Credential]) -> Opened:
        """A socket for ``link`` on a credential not in ``exclude``; every credential tried goes into
        ``tried``. Raises NoCredentialAvailable, or UpgradeRefused / UpstreamError."""
        ...

    def carry_out(self, effects: Sequence[Block], request_id: str) -> None: ...

    def succeeded(self, cred: Credential, session_id: str | None) -> None: ...

    def failed(self, cred: Credential, reason: str) -> None: ...

    def consecutive(self, cred: Credential) -> int: ...

    def available(self, cred: Credential) -> bool: ...

    def usage_events(self, cred: Credential, data: bytes) -> None: ...

    def usage_headers(self, cred: Credential, headers: dict[str, str]) -> None: ...

    def secrets(self) -> Sequence[str]: ...

    def unavailable(self, provider: str) -> NoCredentialAvailable: ...

    def observe(self, record: RequestRecord) -> None: ...
