"""The fake upstream on its own (``python -m proxy.testing.fake_upstream``), told by flags or over HTTP
which credentials to refuse, so that failover can be tried by hand without writing code (README, "Try
failover by hand").

A credential is named by the token the fake receives (an API key, or an OAuth access token). A
*limited* one gets the answer its API gives at a limit, with the time left until the limit ends:
``429 usage_limit_reached`` with ``resets_in_seconds`` on ChatGPT backend paths (``/backend-api/``),
else OpenAI's ``429 rate_limit_exceeded`` with ``Retry-After``. An *unauthorized* one gets ``401
invalid_api_key``. Limits end on the real clock (the fake's).

Flags::

    --port N                   listen on 127.0.0.1:N (default 0: a free port; the URL is printed)
    --limit TOKEN[=SECONDS]    limit TOKEN from the start, for SECONDS (default 3600); repeatable
    --unauthorized TOKEN       refuse TOKEN with 401; repeatable
    --limit-after N[=SECONDS]  limit every token once it has answered N model calls (HTTP or WebSocket)
    --ws-tool-call CMD         on the WebSocket, answer a conversation's first turn with a call of the
                               shell tool running CMD, and the turn carrying its result with text

On the Responses WebSocket (``GET .../responses`` with ``Upgrade: websocket``) a limited token's upgrade
gets the same answer as its HTTP requests, and a socket opened before the limit gets the usage-limit
error frame (``{"type": "error", "status": 429, ...}``) for its next ``response.create``.

Control endpoints, on the fake's own port (recorded apart from model traffic, like the usage endpoint)::

    POST /_fake/limit?token=T[&seconds=S]    limit T from now for S seconds (default 3600)
    POST /_fake/unauthorized?token=T         refuse T with 401
    POST /_fake/clear[?token=T]              lift what was set for T, or for every token
    GET  /_fake/state                        what is set, and how many model requests each token made
"""

from __future__ import annotations

import argparse
import asyncio
import math
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web

from proxy.core.clock import Clock
from proxy.testing.fake_websocket import FakeWebSocket, Socket, Turn


class Recorded(Protocol):
    """What this module reads of a request the fake upstream recorded (its ``Recorded``): the fake
    upstream runs this module as its command line, so this module names only the shape, never the class."""

    @property
    def token(self) -> str | None: ...

    @property
    def path(self) -> str: ...


class FakeUpstream(Protocol):
    """What this module uses of the fake upstream (:class:`proxy.testing.fake_upstream.FakeUpstream`)."""

    clock: Clock

    @property
    def control_routes(self) -> MutableMapping[str, Any]: ...

    def on(self, responder: Any, *, when: Any = None) -> None: ...

    @property
    def websocket(self) -> FakeWebSocket: ...

    def tokens(self) -> list[str | None]: ...

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str: ...


PREFIX = "/_fake"
DEFAULT_SECONDS = 3600


@dataclass
class Controls:
    """Which tokens the fake refuses; :meth:`install` puts the rule and the endpoints on a fake."""

    clock: Clock
    limited: dict[str, float] = field(default_factory=dict)  # token -> until (epoch seconds)
    refused: set[str] = field(default_factory=set)
    after: tuple[int, float] | None = None  # --limit-after: (model calls, seconds)
    fake: FakeUpstream | None = None

    def install(self, fake: FakeUpstream) -> None:
        self.fake = fake
        fake.on(self._answer, when=self._applies)
        # The WebSocket: a refused or limited token's upgrade gets the same answer, and a socket opened
        # before its token was limited gets the usage-limit error frame.
        fake.websocket.gates.append(lambda socket: self._refusal(socket.token, socket.target))
        fake.websocket.on(self._frame, when=self._limited_socket, prewarm=True)
        fake.control_routes[f"{PREFIX}/limit"] = self._limit
        fake.control_routes[f"{PREFIX}/unauthorized"] = self._unauthorized
        fake.control_routes[f"{PREFIX}/clear"] = self._clear
        fake.control_routes[f"{PREFIX}/state"] = self._state

    def limit(self, token: str, seconds: float = DEFAULT_SECONDS) -> None:
        self.limited[token] = self.clock.time() + seconds

    def clear(self, token: str | None = None) -> None:
        if token is None:
            self.limited.clear()
            self.refused.clear()
        else:
            self.limited.pop(token, None)
            self.refused.discard(token)

    def _left(self, token: str | None) -> float:
        until = self.limited.get(token or "")
        return 0.0 if until is None else until - self.clock.time()

    def _applies(self, recorded: Recorded) -> bool:
        self._count_out(recorded.token, 1)
        return recorded.token in self.refused or self._left(recorded.token) > 0

    def _count_out(self, token: str | None, current: int) -> None:
        """--limit-after: limit ``token`` once it answered enough calls (``current`` of them are this one)."""
        if self.after is None or self.fake is None or token is None or self._left(token) > 0:
            return
        calls = sum(1 for t in self.fake.tokens() if t == token)
        for socket in self.fake.websocket.sockets:
            if socket.token == token:
                calls += sum(1 for r in socket.requests() if r.get("generate") is not False)
        if calls - current >= self.after[0]:
            self.limit(token, self.after[1])

    def _limited_socket(self, socket: Socket, request: dict[str, object]) -> bool:
        if request.get("generate") is not False:
            self._count_out(socket.token, 1)
        return self._left(socket.token) > 0

    async def _answer(self, request: web.Request, recorded: Recorded, fake: FakeUpstream) -> web.StreamResponse:
        """The answers of :func:`~proxy.testing.fake_upstream.unauthorized`, ``usage_limit`` and ``rate_limit``."""
        answer = self._refusal(recorded.token, recorded.path)
        assert answer is not None  # _applies said so
        return answer

    def _refusal(self, token: str | None, path: str) -> web.Response | None:
        if token in self.refused:
            return _error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        if self._left(token) <= 0:
            return None
        if "/backend-api/" in path:
            return web.json_response({"error": self._usage_limit(token)}, status=429)
        message = "Rate limit reached for gpt-fake on tokens per min (TPM)."
        left = max(1, math.ceil(self._left(token)))
        return _error(429, message, "tokens", "rate_limit_exceeded", {"Retry-After": str(left)})

    def _usage_limit(self, token: str | None) -> dict[str, object]:
        left = max(1, math.ceil(self._left(token)))
        return {
            "type": "usage_limit_reached",
            "message": "The usage limit has been reached",
            "plan_type": "plus",
            "resets_at": math.ceil(self.clock.time()) + left,
            "eligible_promo": None,
            "resets_in_seconds": left,
        }

    async def _frame(self, turn: Turn) -> None:
        """A limited token's ``response.create`` on a socket opened before the limit."""
        await turn.send({"type": "error", "status": 429, "error": self._usage_limit(turn.socket.token)})

    async def _limit(self, request: web.Request, recorded: Recorded, fake: FakeUpstream) -> web.StreamResponse:
        token = request.query.get("token")
        try:
            seconds = float(request.query.get("seconds", DEFAULT_SECONDS))
        except ValueError:
            seconds = -1.0
        if request.method != "POST" or not token or not 0 < seconds < math.inf:
            return _problem("POST /_fake/limit?token=TOKEN&seconds=SECONDS (a positive number; default 3600)")
        self.limit(token, seconds)
        return web.json_response(self._doc(fake))

    async def _unauthorized(self, request: web.Request, recorded: Recorded, fake: FakeUpstream) -> web.StreamResponse:
        token = request.query.get("token")
        if request.method != "POST" or not token:
            return _problem("POST /_fake/unauthorized?token=TOKEN")
        self.refused.add(token)
        return web.json_response(self._doc(fake))

    async def _clear(self, request: web.Request, recorded: Recorded, fake: FakeUpstream) -> web.StreamResponse:
        if request.method != "POST":
            return _problem("POST /_fake/clear, or /_fake/clear?token=TOKEN")
        self.clear(request.query.get("token"))
        return web.json_response(self._doc(fake))

    async def _state(self, request: web.Request, recorded: Recorded, fake: FakeUpstream) -> web.StreamResponse:
        return web.json_response(self._doc(fake))

    def _doc(self, fake: FakeUpstream) -> dict[str, object]:
        requests: dict[str, int] = {}
        for token in fake.tokens():
            requests[token or ""] = requests.get(token or "", 0) + 1
        sockets: dict[str, int] = {}
        calls: dict[str, int] = {}
        for socket in fake.websocket.accepted():
            token = socket.token or ""
            sockets[token] = sockets.get(token, 0) + 1
            calls[token] = calls.get(token, 0) + len(socket.requests())
        return {
            "limited": {t: math.ceil(left) for t in self.limited if (left := self._left(t)) > 0},
            "unauthorized": sorted(self.refused),
            "requests": requests,
            "websocket": {"sockets": sockets, "response_creates": calls},
        }


def _error(status: int, message: str, kind: str, code: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def _problem(usage: str) -> web.Response:
    return web.json_response({"error": {"message": f"usage: {usage}", "type": "invalid_request_error"}}, status=400)


def _limit_flag(value: str) -> tuple[str, float]:
    token, sep, seconds = value.partition("=")
    try:
        number = float(seconds) if sep else float(DEFAULT_SECONDS)
    except ValueError:
        number = -1.0
    if not token or not 0 < number < math.inf:
        raise argparse.ArgumentTypeError("TOKEN or TOKEN=SECONDS (a positive number of seconds)")
    return token, number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m proxy.testing.fake_upstream",
        description="credproxy's fake OpenAI / ChatGPT upstream, on 127.0.0.1 only",
        epilog=f"control endpoints: POST {PREFIX}/limit?token=T&seconds=S, POST {PREFIX}/unauthorized?token=T, "
        f"POST {PREFIX}/clear[?token=T], GET {PREFIX}/state",
    )
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    parser.add_argument(
        "--limit",
        type=_limit_flag,
        action="append",
        default=[],
        metavar="TOKEN[=SECONDS]",
        help=f"answer this key or access token with a limit for SECONDS (default {DEFAULT_SECONDS})",
    )
    parser.add_argument(
        "--unauthorized", action="append", default=[], metavar="TOKEN", help="answer this token with 401"
    )
    parser.add_argument(
        "--limit-after",
        type=_limit_flag,
        metavar="N[=SECONDS]",
        help=f"limit every token once it has answered N model calls, for SECONDS (default {DEFAULT_SECONDS})",
    )
    parser.add_argument(
        "--ws-tool-call",
        metavar="CMD",
        help="WebSocket: answer a first turn with a call of the shell tool running CMD, its result with text",
    )
    return parser


def run(fake: FakeUpstream, argv: Sequence[str] | None = None) -> None:
    """``python -m proxy.testing.fake_upstream [flags]``: serve ``fake`` with the flags' limits until killed."""
    args = build_parser().parse_args(argv)
    controls = Controls(fake.clock)
    controls.install(fake)
    for token, seconds in args.limit:
        controls.limit(token, seconds)
    controls.refused.update(args.unauthorized)
    if args.limit_after is not None:
        count, seconds = args.limit_after
        if not count.isdigit() or int(count) < 1:
            build_parser().error("--limit-after: N must be a whole number of calls, at least 1")
        controls.after = (int(count), seconds)
    if args.ws_tool_call:
        from proxy.testing import fake_websocket  # noqa: PLC0415 (the command line's own)

        def is_result(socket: Socket, request: dict[str, object]) -> bool:
            items = request.get("input")
            return isinstance(items, list) and any(
                isinstance(i, dict) and i.get("type") == "function_call_output" for i in items
            )

        fake.websocket.on(fake_websocket.text("done: the tool ran"), when=is_result)
        fake.websocket.on(fake_websocket.function_call(args.ws_tool_call))

    async def serve() -> None:
        url = await fake.start("127.0.0.1", args.port)
        print(f"fake upstream on {url} (control: {url}{PREFIX}/state)", flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())
