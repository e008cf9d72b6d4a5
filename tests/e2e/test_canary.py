"""Secrets never leave: real traffic with canary tokens, then search everything a person could see.

Every token and refresh token in the pool is a canary. Traffic covers a success, an SSE stream, a
replay after a 429, a 401 that disables a key, every credential blocked (429 from the proxy), an
OAuth account (usage endpoint, account header), Anthropic keys (sent as ``x-api-key``: success,
stream, replay, disable, usage windows, all blocked) and a malformed request whose header holds a canary.
Then the canaries are searched for in every log line (every logger, DEBUG and up, text and JSON),
every response body and header, the status and ``which`` JSON and the metrics text.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from proxy.app import ACCOUNTS, known_secrets, make_app
from proxy.config import Logging, load_config
from proxy.core.clock import ManualClock
from proxy.core.selection import fnv1a_utf16
from proxy.observe import logs
from proxy.testing import fake_anthropic
from proxy.testing import fake_websocket as ws
from proxy.testing.fake_upstream import (
    FakeUpstream,
    Recorded,
    Responder,
    json_body,
    rate_limit,
    unauthorized,
    usage_limit,
)
from tests.conftest import ProxyFactory, RunningProxy, default_providers, run_credproxy, wait_until, write_json
from tests.e2e.wsclient import USER, WsClient, create, turn, wsc

__all__ = ["wsc"]  # the fixture

# Not shaped like sk-... or a JWT: only the pool's own knowledge of its secrets could mask them.
CANARY_KEYS = ("canaryKEYalpha7f3a9c", "canaryKEYbravo2b8d41", "canaryKEYcharlie9e6c")
CANARY_ACCESS = "canaryACCESSdelta5a1f"
CANARY_REFRESH = "canaryREFRESHecho0c7e"
CANARY_ANTHROPIC = ("canaryANTHROPIChotel4e1d", "canaryANTHROPICindia7c2b", "canaryANTHROPICjuliet05")
CANARIES = (*CANARY_KEYS, CANARY_ACCESS, CANARY_REFRESH, *CANARY_ANTHROPIC)
SID = "canary-session"
FIRST = fnv1a_utf16(SID) % 3


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    access = logging.getLogger("aiohttp.access")
    access_level = access.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    access.setLevel(access_level)


class Seen:
    """Everything a client received."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    async def call(self, p: RunningProxy, method: str, path: str, **kwargs: object) -> int:
        async with p.request(method, path, **kwargs) as r:
            body = await r.read()
            self.parts.append(f"{r.status} {r.reason}")
            self.parts.extend(f"{k}: {v}" for k, v in r.headers.items())
            self.parts.append(body.decode("utf-8", "replace"))
            status: int = r.status
            return status


@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.usefixtures("restore_logging")
async def test_no_canary_in_logs_responses_status_or_metrics(proxy: ProxyFactory, fake: FakeUpstream, fmt: str) -> None:
    keys = [{"type": "api_key", "key": k} for k in CANARY_KEYS]
    account = {"type": "oauth", "access": CANARY_ACCESS, "refresh": CANARY_REFRESH, "accountId": "acct-canary"}
    p = await proxy(
        {
            "openai": keys,
            "openai-codex": [account, {**account, "access": "x" * 20, "refresh": "y" * 20, "accountId": "acct-2"}],
            "anthropic": [{"type": "api_key", "key": k} for k in CANARY_ANTHROPIC],
        },
        providers={
            **default_providers(fake),
            "anthropic": {"mount": "/anthropic", "upstream": f"http://127.0.0.1:{fake.port}"},
        },
    )
    stream = io.StringIO()
    logs.configure(Logging(format=fmt, level="debug"), known=known_secrets(p.app), stream=stream)
    seen = Seen()
    body = {"model": "m", "input": "hi"}
    session = {"X-Session-Id": SID}

    assert await seen.call(p, "POST", "/openai/responses", json=body, headers=session) == 200
    assert await seen.call(p, "POST", "/openai/responses", json={**body, "stream": True}, headers=session) == 200
    fake.on(rate_limit(headers={"retry-after": "30"}), token=CANARY_KEYS[FIRST], times=1)
    assert await seen.call(p, "POST", "/openai/responses", json=body, headers=session) == 200
    fake.on(unauthorized(), token=CANARY_KEYS[(FIRST + 1) % 3])
    assert await seen.call(p, "POST", "/openai/responses", json={**body, "stream": True}, headers=session) == 200
    fake.on(usage_limit(resets_in=600), token=CANARY_KEYS[(FIRST + 2) % 3])
    assert await seen.call(p, "POST", "/openai/responses", json=body, headers=session) == 429
    assert await seen.call(p, "POST", "/codex/responses", json={**body, "stream": True}, headers=session) == 200
    fake.on(usage_limit(resets_in=600))
    assert await seen.call(p, "POST", "/codex/responses", json=body) == 429
    assert await seen.call(p, "GET", "/openai/models", headers={"Authorization": "Bearer client-own-token"}) == 429

    # Anthropic keys: success, stream, a 429 replayed, a 401 that disables one, the last one limited.
    fake.reset_rules()
    message = {"model": "claude-haiku-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    claude = {"x-api-key": "client-dummy", "anthropic-version": "2023-06-01", "X-Claude-Code-Session-Id": SID}
    assert await seen.call(p, "POST", "/anthropic/v1/messages", json=message, headers=claude) == 200
    streamed = {**message, "stream": True}
    assert await seen.call(p, "POST", "/anthropic/v1/messages?beta=true", json=streamed, headers=claude) == 200
    fake.on(fake_anthropic.rate_limit(retry_after=30), token=CANARY_ANTHROPIC[FIRST], times=1)
    assert await seen.call(p, "POST", "/anthropic/v1/messages", json=message, headers=claude) == 200
    fake.on(
        fake_anthropic.error(401, "authentication_error", "invalid x-api-key"), token=CANARY_ANTHROPIC[(FIRST + 1) % 3]
    )
    assert await seen.call(p, "POST", "/anthropic/v1/messages", json=streamed, headers=claude) == 200
    fake.on(fake_anthropic.rate_limit(retry_after=600), token=CANARY_ANTHROPIC[(FIRST + 2) % 3])
    assert await seen.call(p, "POST", "/anthropic/v1/messages", json=message, headers=claude) == 429

    # A malformed request whose overlong header starts with a canary: aiohttp's 400 quotes the start of
    # the line back to the client that sent it (its own bytes, so not kept in `seen`); the log must not.
    host, port = p.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /openai/models HTTP/1.1\r\nHost: x\r\nX-Leak: " + CANARY_KEYS[0].encode() * 1000 + b"\r\n\r\n")
    await writer.drain()
    assert b" 400 " in await asyncio.wait_for(reader.read(10000), 10)
    writer.close()

    label = f"openai%23{FIRST + 1}"
    assert await seen.call(p, "POST", f"/_credproxy/credentials/{label}/unblock") == 200
    for path in (
        "/_credproxy/status",
        "/_credproxy/metrics",
        f"/_credproxy/which?session={SID}&provider=openai",
        f"/_credproxy/which?session={SID}&provider=anthropic",
    ):
        assert await seen.call(p, "GET", path) == 200

    # The traffic really used the canaries, and the logs really saw the requests.
    assert set(fake.tokens()) >= set(CANARY_KEYS) | {CANARY_ACCESS} | set(CANARY_ANTHROPIC)
    assert any(r.token == CANARY_ACCESS for r in fake.control)  # the usage endpoint was asked with the account
    log_text = stream.getvalue()
    assert log_text.count("/openai/responses") >= 5
    assert log_text.count("/anthropic/v1/messages") >= 5
    assert "anthropic-ratelimit" in "\n".join(seen.parts)  # the windows reached the client (and status)
    assert "limited" in log_text
    assert "disabled" in log_text
    assert re.search(r"refused a malformed request: (LineTooLong|a header is longer)", log_text)
    everything = log_text + "\n".join(seen.parts)
    for canary in CANARIES:
        assert canary not in everything, canary


@pytest.mark.usefixtures("restore_logging")
def test_the_redis_password_and_client_tokens_are_masked_in_every_log_line(tmp_path: Path) -> None:
    """Neither is shaped like a credential: only the process's own list of its secrets can mask them."""
    password, client_token = "canaryREDISfoxtrot3d2e", "canaryCLIENTgolf8b1a"
    write_json(tmp_path / "auth.json", {"openai": [{"type": "api_key", "key": CANARY_KEYS[0]}]})
    config = write_json(
        tmp_path / "config.json",
        {
            "credentials_file": "auth.json",
            "providers": {"openai": {"mount": "/openai", "upstream": "http://127.0.0.1:9/v1"}},
            "state": {"backend": "redis", "url": f"redis://:{password}@127.0.0.1:9/0"},
            "security": {"client_tokens": [client_token]},
        },
    )
    app = make_app(load_config(config))
    stream = io.StringIO()
    logs.configure(Logging(level="debug"), known=known_secrets(app), stream=stream)
    log = logging.getLogger("redis.connection")
    log.warning("AUTH %s failed", password)
    try:
        raise ConnectionError(f"redis://:{password}@127.0.0.1:9/0 refused; client {client_token}")
    except ConnectionError:
        log.exception("the Redis state sync failed")
    logging.getLogger("credproxy").info("key %s token %s", CANARY_KEYS[0], client_token)
    logging.getLogger().handlers[0].flush()
    written = stream.getvalue()
    assert written.count("***") >= 5
    for secret in (password, client_token, CANARY_KEYS[0]):
        assert secret not in written


def reflect(status: int, reason: str | None = None, padding: int = 0) -> Responder:
    """An upstream that hands back what it was sent: the Authorization header, and the key in its error body."""

    async def respond(request: web.Request, recorded: Recorded, fake: FakeUpstream) -> web.StreamResponse:
        auth = recorded.header("authorization") or ""
        body = {
            "error": {
                "message": f"Incorrect API key provided: {recorded.token}; also sk-notOurs0123456789",
                "type": "invalid_request_error",
                "code": auth,
                "padding": "x" * padding,
            }
        }
        headers = {"X-Echo-Authorization": auth, "X-Request-Id": "req_123"}
        return web.Response(
            status=status, reason=reason, body=orjson.dumps(body), content_type="application/json", headers=headers
        )

    return respond


async def test_an_upstream_that_reflects_the_credential_hands_the_client_none(
    proxy: ProxyFactory, fake: FakeUpstream
) -> None:
    """Headers, the reason phrase and a buffered error body are masked; Content-Length follows; the
    upstream did get the real key. A 200's body is a committed stream: relayed as is (README)."""
    p = await proxy({"openai": [{"type": "api_key", "key": CANARY_KEYS[0]}]})
    fake.on(reflect(200), path="/models")
    fake.on(reflect(400, reason=f"Bad {CANARY_KEYS[0]}"), path="/responses")
    fake.on(reflect(404, padding=300 * 1024), path="/files")  # larger than the error body buffer

    async with p.post("/openai/responses", json={"model": "m"}) as r:
        body = await r.read()
        assert r.status == 400
        assert r.reason == "Bad ***"
        assert r.headers["X-Echo-Authorization"] == "Bearer ***"
        assert r.headers["X-Request-Id"] == "req_123"
        assert int(r.headers["Content-Length"]) == len(body)
        error = orjson.loads(body)["error"]
        assert error["message"] == "Incorrect API key provided: ***; also ***"
        assert error["code"] == "Bearer ***"
    async with p.get("/openai/models") as r:
        assert r.status == 200
        assert r.headers["X-Echo-Authorization"] == "Bearer ***"
        assert CANARY_KEYS[0] in (await r.read()).decode()  # a committed stream is not rewritten
    async with p.get("/openai/files") as r:
        body = await r.read()
        assert r.status == 404
        assert r.headers["X-Echo-Authorization"] == "Bearer ***"
        assert "Content-Length" not in r.headers  # the rest followed unbuffered: chunked
        assert CANARY_KEYS[0] not in body.decode()
        assert len(orjson.loads(body)["error"]["padding"]) == 300 * 1024
    assert [r.token for r in fake.records] == [CANARY_KEYS[0]] * 3


async def test_status_shows_codes_never_the_upstreams_text(
    proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock
) -> None:
    """An error code that echoes the key, a token endpoint that quotes the refresh token: neither reaches
    status (JSON or `credproxy status`), the state view or the state file; the codes that can be read do."""
    expiring = int((clock.time() + 120) * 1000)  # inside the refresh margin, still valid: served after the failure
    account = {"type": "oauth", "label": "acct", "access": CANARY_ACCESS, "refresh": CANARY_REFRESH}
    p = await proxy(
        {
            "openai": [{"type": "api_key", "label": k[9:14], "key": k} for k in CANARY_KEYS[:2]],
            "openai-codex": [{**account, "expires": expiring, "accountId": "acct-canary"}],
        }
    )
    fake.control_routes["/oauth/token"] = json_body(
        400, {"error": f"invalid_grant: refresh_token {CANARY_REFRESH} is not valid"}
    )
    fake.on(json_body(429, {"error": {"code": f"Bearer {CANARY_KEYS[0]}"}}), token=CANARY_KEYS[0])
    fake.on(json_body(400, {"error": {"code": f"{CANARY_KEYS[1]}", "message": "no"}}), token=CANARY_KEYS[1])
    async with p.post("/openai/responses", json={"model": "m"}, headers={"session-id": "s"}) as r:
        assert r.status == 400
    async with p.post("/codex/responses", json={"model": "m"}) as r:
        assert r.status == 200  # served at once; the refresh runs in the background
    custodian = p.app[ACCOUNTS].custodian
    await wait_until(lambda: any(r.path.endswith("/oauth/token") for r in fake.control))
    await wait_until(lambda: not custodian.status()["refreshing"])

    async with p.get("/_credproxy/status") as r:
        status = (await r.read()).decode()
    async with p.get("/_credproxy/state") as r:
        state = (await r.read()).decode()
    code, printed, err = await run_credproxy("status", "--url", p.url)
    assert code == 0, err
    await p.stop()  # the state file is written
    state_file = (p.credentials_file.parent / "auth.state.json").read_text()
    for canary in CANARIES:
        for text in (status, state, printed, state_file):
            assert canary not in text, canary
    creds = {c["label"]: c for prov in orjson.loads(status)["providers"] for c in prov["credentials"]}
    assert creds["alpha"]["last_error"] == "unrecognised_error"
    assert creds["alpha"]["reason"] == "unrecognised_error"
    assert creds["bravo"]["last_error"] == "unrecognised_error"
    assert creds["acct"]["last_error"] == "refresh_failed:invalid_grant"  # its leading code: a dead grant
    assert creds["acct"]["state"] == "needs_relogin"
    assert "refresh_failed:invalid_grant" in printed


@pytest.mark.usefixtures("restore_logging")
async def test_no_canary_on_the_websocket(wsc: WsClient, proxy: ProxyFactory, fake: FakeUpstream) -> None:
    """The Responses WebSocket: a refused upgrade that echoes every secret (passed to the client), one that
    limits a key (failover at the handshake), a 101 whose headers echo one, an error frame that quotes the
    key, limits on the socket (failover), every credential limited (credproxy's own frame); then logs at
    DEBUG, everything the client got, status and metrics."""
    everyone = " ".join((*CANARY_KEYS, CANARY_ACCESS, CANARY_REFRESH))
    account = {"type": "oauth", "access": CANARY_ACCESS, "refresh": CANARY_REFRESH, "accountId": "acct-canary"}
    p = await proxy({"openai-codex": [*({"type": "api_key", "key": k} for k in CANARY_KEYS), account]})
    stream = io.StringIO()
    logs.configure(Logging(format="text", level="debug"), known=known_secrets(p.app), stream=stream)
    seen: list[str] = []
    key = [CANARY_KEYS[(FIRST + i) % 3] for i in range(3)]  # the session's order: the keys, then the account

    upgrade = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13", "session-id": SID}
    upgrade["Sec-WebSocket-Key"] = "dGhlIHNhbXBsZSBub25jZQ=="
    fake.websocket.refuse(404, {"error": {"message": everyone}}, headers={"X-Echo": everyone}, times=1)
    async with p.get("/codex/responses", headers=upgrade) as r:
        assert r.status == 404
        seen.extend([*(f"{k}: {v}" for k, v in r.headers.items()), (await r.read()).decode()])

    async def quote_the_key(t: ws.Turn) -> None:
        error = {"type": "invalid_request_error", "code": "bad", "message": f"Incorrect API key: {t.socket.token}"}
        await t.send({"type": "error", "status": 400, "error": error})

    limited = {"error": {"type": "usage_limit_reached", "message": f"{key[0]} is limited", "resets_in_seconds": 600}}
    fake.websocket.refuse(429, limited, headers={"X-Echo": key[0]}, token=key[0])
    fake.websocket.upgrade_headers["x-echo"] = everyone
    fake.websocket.on(quote_the_key, token=key[1], times=1)
    fake.websocket.on(ws.usage_limit(), token=key[1])
    fake.websocket.on(ws.usage_limit(), token=key[2], when=lambda s, r: "previous_response_id" in r)
    fake.websocket.on(ws.usage_limit(), token=CANARY_ACCESS)
    socket = await wsc.connect(p, sid=SID)
    seen.extend(f"{k}: {v}" for k, v in wsc.upgrade().items())
    frames = [await turn(socket, create(USER)) for _ in range(2)]  # the quoted key; a failover to key[2]
    rid = orjson.loads(frames[-1][-1])["response"]["id"]
    frames.append(await turn(socket, create(USER, previous=rid)))  # key[2], then the account: all limited
    seen.extend(f.decode() for got in frames for f in got)
    await socket.close()
    for path in ("/_credproxy/status", "/_credproxy/metrics"):
        async with p.get(path) as r:
            seen.append(await r.text())

    assert [s.token for s in fake.websocket.sockets] == [key[0], key[0], key[1], key[2], CANARY_ACCESS]
    assert b"Incorrect API key: ***" in frames[0][0]  # the error frame, masked
    assert orjson.loads(frames[-1][-1])["error"]["type"] == "usage_limit_reached"  # credproxy's own
    log_text = stream.getvalue()
    assert "limited" in log_text
    assert " WS /codex/responses" in log_text
    everything = log_text + "\n".join(seen)
    for canary in CANARIES:
        assert canary not in everything, canary
