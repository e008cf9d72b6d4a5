"""The fake upstream's Responses WebSocket (``GET .../responses`` with ``Upgrade: websocket``), scripted per
credential, recording every handshake header and every frame it receives and sends.

It behaves as the ChatGPT backend does for Codex (protocol.md 11, notes of the Codex 0.171.0 runs):

* the 101 carries ``x-codex-turn-state``, ``x-models-etag``, ``x-reasoning-included`` (and whatever
  :attr:`FakeWebSocket.upgrade_headers` adds, e.g. ``x-codex-*`` usage headers or ``openai-model``);
* each ``response.create`` is answered with the events of a response, one JSON object per text frame:
  a text message by default, an empty response for a pre-warm (``"generate": false``);
* the conversation lives on the socket: a ``previous_response_id`` this socket did not produce is
  answered with the backend's ``previous_response_not_found`` error frame (status 400), so a test can
  tell a request that was rebuilt in full from one passed on chained;
* pings it receives are answered, binary frames are echoed back, a close is answered and recorded.

Replies are scripted like the HTTP fake's answers (:meth:`FakeWebSocket.on`, earliest matching rule
first, by token, count or predicate): :func:`text`, :func:`function_call`, :func:`usage_limit` (before
the first event, or after some), :func:`connection_limit`, :func:`close`, :func:`silent`, or any
:data:`Reply`. :meth:`FakeWebSocket.refuse` refuses upgrades with an HTTP answer (a 429 usage limit, a
404...). The module never imports :mod:`proxy.testing.fake_upstream` (which imports it).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from proxy.core.clock import Clock
from proxy.testing.fake_bodies import responses_events


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame as the fake received or sent it: its kind (``text``, ``binary``, ``ping``, ``pong``,
    ``close``) and its payload (a close's payload is its code and reason, as text)."""

    kind: str
    data: bytes

    def json(self) -> Any:
        return orjson.loads(self.data)


@dataclass(slots=True)
class Socket:
    """One WebSocket the fake accepted (or refused: ``accepted`` False), with everything it carried."""

    number: int
    target: str
    headers: tuple[tuple[str, str], ...]
    accepted: bool = False
    compressed: bool = False
    received: list[Frame] = field(default_factory=list)
    sent: list[Frame] = field(default_factory=list)
    close_code: int | None = None  # the code the other side closed with, if it did
    responses: list[str] = field(default_factory=list)  # ids of the responses this socket produced
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    def header(self, name: str) -> str | None:
        lower = name.lower()
        return next((v for k, v in self.headers if k.lower() == lower), None)

    @property
    def token(self) -> str | None:
        auth = self.header("authorization")
        return auth[7:] if auth and auth.startswith("Bearer ") else auth

    def requests(self) -> list[dict[str, Any]]:
        """The ``response.create`` frames this socket received, parsed."""
        docs = [f.json() for f in self.received if f.kind == "text"]
        return [d for d in docs if isinstance(d, dict) and d.get("type") == "response.create"]


class Turn:
    """One ``response.create`` being answered: what a :data:`Reply` works with."""

    def __init__(self, fake: FakeWebSocket, socket: Socket, ws: web.WebSocketResponse, request: dict[str, Any]):
        self.fake = fake
        self.socket = socket
        self.ws = ws
        self.request = request
        self.closed = False

    @property
    def model(self) -> str:
        model = self.request.get("model")
        return model if isinstance(model, str) else "gpt-fake"

    def response_id(self) -> str:
        rid = f"resp_ws{self.socket.number}_{next(self.fake.ids)}"
        self.socket.responses.append(rid)
        return rid

    async def send(self, *frames: Mapping[str, Any] | bytes) -> None:
        for frame in frames:
            data = frame if isinstance(frame, bytes) else orjson.dumps(frame)
            self.socket.sent.append(Frame("text", data))
            await self.ws.send_frame(data, WSMsgType.TEXT)

    async def close(self, code: int, reason: bytes = b"fake close") -> None:
        self.closed = True
        self.socket.sent.append(Frame("close", b"%d %s" % (code, reason)))
        await self.ws.close(code=code, message=reason)

    def now(self) -> int:
        return int(self.fake.clock.time())


Reply = Callable[[Turn], Awaitable[None]]


When = Callable[[Socket, dict[str, Any]], bool]
#: Decides a handshake before the scripted refusals: an HTTP answer refuses it, ``None`` lets it through.
Gate = Callable[[Socket], web.StreamResponse | None]


@dataclass(slots=True)
class _Rule:
    reply: Reply
    token: str | None
    times: int | None
    when: When | None
    prewarm: bool


@dataclass(slots=True)
class _Refusal:
    status: int
    body: bytes
    headers: Mapping[str, str]
    token: str | None
    times: int | None


UPGRADE_HEADERS = {"x-models-etag": "fake-etag-1", "x-reasoning-included": "true"}


@dataclass
class FakeWebSocket:
    clock: Clock
    sockets: list[Socket] = field(default_factory=list)
    #: Headers of every 101 (``{n}`` becomes the socket's number); x-codex-turn-state is added per socket.
    upgrade_headers: dict[str, str] = field(default_factory=lambda: dict(UPGRADE_HEADERS))
    compress: bool = True  # accept permessage-deflate when offered
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    gates: list[Gate] = field(default_factory=list)
    _rules: list[_Rule] = field(default_factory=list)
    _refusals: list[_Refusal] = field(default_factory=list)
    #: Set when a socket ends; tests wait on it instead of sleeping.
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def on(
        self,
        reply: Reply,
        *,
        token: str | None = None,
        times: int | None = None,
        when: When | None = None,
        prewarm: bool = False,
    ) -> None:
        """Answer matching ``response.create`` frames with ``reply``; the earliest matching rule wins.
        ``when(socket, request)`` narrows the match; a pre-warm (``"generate": false``) matches only a
        rule with ``prewarm``."""
        self._rules.append(_Rule(reply, token, times, when, prewarm))

    def refuse(
        self,
        status: int,
        body: object = None,
        *,
        headers: Mapping[str, str] | None = None,
        token: str | None = None,
        times: int | None = None,
    ) -> None:
        """Refuse matching upgrades with ``status`` and ``body`` (JSON unless bytes)."""
        data = body if isinstance(body, bytes) else orjson.dumps(body) if body is not None else b""
        self._refusals.append(_Refusal(status, data, headers or {}, token, times))

    def reset_rules(self) -> None:
        self._rules.clear()
        self._refusals.clear()

    def accepted(self) -> list[Socket]:
        return [s for s in self.sockets if s.accepted]

    def tokens(self) -> list[str | None]:
        """The token of every upgrade received, in order."""
        return [s.token for s in self.sockets]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        socket = Socket(len(self.sockets) + 1, request.raw_path, tuple(request.headers.items()))
        self.sockets.append(socket)
        for gate in self.gates:
            answer = gate(socket)
            if answer is not None:
                socket.ended.set()
                return answer
        refusal = self._refusal(socket.token)
        if refusal is not None:
            socket.ended.set()
            ctype = "application/json" if refusal.body.startswith(b"{") else "text/plain"
            return web.Response(status=refusal.status, body=refusal.body, headers=refusal.headers, content_type=ctype)
        ws = web.WebSocketResponse(autoping=False, autoclose=False, compress=self.compress, max_msg_size=0)
        for name, value in self.upgrade_headers.items():
            ws.headers[name] = value.replace("{n}", str(socket.number))
        ws.headers["x-codex-turn-state"] = f"fake-turn-state-{socket.number}"
        await ws.prepare(request)
        socket.accepted = True
        socket.compressed = bool(ws.compress)
        try:
            await self._serve(socket, ws)
        finally:
            socket.ended.set()
            self.changed.set()
        return ws

    async def _serve(self, socket: Socket, ws: web.WebSocketResponse) -> None:
        while True:  # not ``async for``: it ends at a close without showing it
            msg = await ws.receive()
            if msg.type is WSMsgType.TEXT:
                data = msg.data.encode() if isinstance(msg.data, str) else msg.data
                socket.received.append(Frame("text", data))
                turn = await self._answer(socket, ws, data)
                if turn is not None and turn.closed:
                    return
            elif msg.type is WSMsgType.BINARY:
                socket.received.append(Frame("binary", msg.data))
                socket.sent.append(Frame("binary", msg.data))
                await ws.send_bytes(msg.data)
            elif msg.type is WSMsgType.PING:
                socket.received.append(Frame("ping", msg.data))
                socket.sent.append(Frame("pong", msg.data))
                await ws.pong(msg.data)
            elif msg.type is WSMsgType.PONG:
                socket.received.append(Frame("pong", msg.data))
            elif msg.type is WSMsgType.CLOSE:
                socket.close_code = msg.data
                socket.received.append(Frame("close", f"{msg.data} {msg.extra or ''}".encode()))
                await ws.close(code=msg.data if msg.data else 1000)
                return
            else:  # CLOSING, CLOSED, ERROR: the connection went away without a close
                socket.close_code = ws.close_code
                return

    async def _answer(self, socket: Socket, ws: web.WebSocketResponse, data: bytes) -> Turn | None:
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(doc, dict) or doc.get("type") != "response.create":
            return None
        turn = Turn(self, socket, ws, doc)
        previous = doc.get("previous_response_id")
        if previous is not None and previous not in socket.responses:
            await turn.send(previous_not_found(previous))
            return turn
        reply = self._reply(socket, doc)
        await reply(turn)
        return turn

    def _reply(self, socket: Socket, doc: dict[str, Any]) -> Reply:
        warm = doc.get("generate") is False
        default = prewarm if warm else text()
        for rule in self._rules:
            if warm and not rule.prewarm:
                continue
            if rule.token is not None and rule.token != socket.token:
                continue
            if rule.when is not None and not rule.when(socket, doc):
                continue
            if rule.times is not None:
                if rule.times <= 0:
                    continue
                rule.times -= 1
            return rule.reply
        return default

    def _refusal(self, token: str | None) -> _Refusal | None:
        for refusal in self._refusals:
            if refusal.token is not None and refusal.token != token:
                continue
            if refusal.times is not None:
                if refusal.times <= 0:
                    continue
                refusal.times -= 1
            return refusal
        return None


def is_upgrade(request: web.BaseRequest) -> bool:
    return request.method == "GET" and "websocket" in request.headers.get("Upgrade", "").lower()


# Replies --------------------------------------------------------------------------------------


async def prewarm(turn: Turn) -> None:
    """The answer to ``"generate": false``: an empty completed response (what Codex needs to chain on)."""
    rid = turn.response_id()
    events = responses_events(rid, turn.model, "", turn.now())
    done = events[-1]
    done["response"]["output"] = []
    await turn.send(events[0], done)


def text(message: str = "hi", *, usage: Mapping[str, Any] | None = None) -> Reply:
    """A text answer: the events of a streamed Responses answer, one per frame; ``usage``: a
    ``codex.rate_limits`` event first (its ``rate_limits`` object)."""

    async def reply(turn: Turn) -> None:
        if usage is not None:
            await turn.send(rate_limits_event(usage))
        await turn.send(*responses_events(turn.response_id(), turn.model, message, turn.now()))

    return reply


def function_call(command: str = "echo fake-tool-ran") -> Reply:
    """A call of the shell tool the request offers (Codex 0.171.0 offers ``exec_command``)."""

    async def reply(turn: Turn) -> None:
        rid = turn.response_id()
        name, arguments = _tool(turn.request, command)
        item = {
            "type": "function_call",
            "id": f"fc_{rid}",
            "call_id": f"call_{rid}",
            "name": name,
            "arguments": orjson.dumps(arguments).decode(),
            "status": "completed",
        }
        base = {"id": rid, "object": "response", "created_at": turn.now(), "model": turn.model, "output": []}
        await turn.send(
            {"type": "response.created", "response": {**base, "status": "in_progress"}},
            {"type": "response.output_item.added", "output_index": 0, "item": {**item, "status": "in_progress"}},
            {"type": "response.output_item.done", "output_index": 0, "item": item},
            {"type": "response.completed", "response": {**base, "status": "completed", "output": [item]}},
        )

    return reply


def usage_limit(
    resets_in: int | None = 3600,
    *,
    after: int = 0,
    status_key: str = "status",
    status: int = 429,
    code: str = "usage_limit_reached",
    headers: Mapping[str, str] | None = None,
) -> Reply:
    """The backend's usage-limit error frame (protocol.md 3.1), after ``after`` events of a text answer;
    ``resets_in`` ``None``: no reset in the error (the frame's ``headers`` may say when)."""

    async def reply(turn: Turn) -> None:
        if after:
            await turn.send(*responses_events(turn.response_id(), turn.model, "partial", turn.now())[:after])
        error: dict[str, Any] = {"type": code, "message": "The usage limit has been reached", "plan_type": "plus"}
        if resets_in is not None:
            error.update(resets_at=turn.now() + resets_in, resets_in_seconds=resets_in)
        frame: dict[str, Any] = {"type": "error", status_key: status, "error": error}
        frame["headers"] = dict(headers) if headers is not None else {"x-codex-primary-used-percent": "100.0"}
        await turn.send(frame)

    return reply


def connection_limit() -> Reply:
    """The backend's answer on a socket it will not keep (sockets are capped at 60 minutes)."""

    async def reply(turn: Turn) -> None:
        error = {
            "type": "invalid_request_error",
            "code": "websocket_connection_limit_reached",
            "message": "Responses websocket connection limit reached (60 minutes). Create a new websocket "
            "connection to continue.",
        }
        await turn.send({"type": "error", "status": 400, "error": error})

    return reply


def close(code: int = 1000, *, after: int = 0) -> Reply:
    """Close the socket after ``after`` events of a text answer (0: before any)."""

    async def reply(turn: Turn) -> None:
        if after:
            await turn.send(*responses_events(turn.response_id(), turn.model, "partial", turn.now())[:after])
        await turn.close(code)

    return reply


def silent() -> Reply:
    """Accept the request and never answer it."""

    async def reply(turn: Turn) -> None:
        return None

    return reply


def ping_then(payload: bytes, then: Reply) -> Reply:
    """Ping the other side (its pong is recorded), then answer with ``then``."""

    async def reply(turn: Turn) -> None:
        turn.socket.sent.append(Frame("ping", payload))
        await turn.ws.ping(payload)
        await then(turn)

    return reply


def events(frames: list[Mapping[str, Any] | bytes], *, gate: asyncio.Event | None = None, at: int = 0) -> Reply:
    """Exactly these frames; with ``gate``, wait for it before frame ``at``."""

    async def reply(turn: Turn) -> None:
        for i, frame in enumerate(frames):
            if gate is not None and i == at:
                await gate.wait()
            await turn.send(frame)

    return reply


def rate_limits_event(limits: Mapping[str, Any]) -> dict[str, Any]:
    return {"type": "codex.rate_limits", "plan_type": "plus", "rate_limits": dict(limits)}


def previous_not_found(previous: object) -> dict[str, Any]:
    error = {
        "type": "invalid_request_error",
        "code": "previous_response_not_found",
        "message": f"Previous response with id '{previous}' not found.",
        "param": "previous_response_id",
    }
    return {"type": "error", "status": 400, "error": error}


def _tool(request: Mapping[str, Any], command: str) -> tuple[str, dict[str, Any]]:
    names = {t.get("name") for t in request.get("tools") or () if isinstance(t, dict)}
    if "exec_command" in names:
        return "exec_command", {"cmd": command, "yield_time_ms": 1000}
    if "shell_command" in names:
        return "shell_command", {"command": command}
    return "shell", {"command": ["bash", "-lc", command]}
