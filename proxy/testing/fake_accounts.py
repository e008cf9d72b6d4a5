"""Fake ChatGPT accounts for tests and the demo: an OAuth token endpoint that behaves like OpenAI's.

:class:`FakeAccounts` plugs into a :class:`~proxy.testing.fake_upstream.FakeUpstream` (``install``). It issues
unsigned JWT access tokens (with ``exp`` and the account-id claim, as Codex reads them) and refresh
tokens that **rotate and are single-use**: redeeming a refresh token returns a new one and kills the
old; redeeming a dead one answers ``refresh_token_reused`` and, like OpenAI may, revokes the whole
family (every later refresh of that account answers ``refresh_token_invalidated``). It counts token
calls per refresh-token generation, so tests can assert "exactly one call per generation".

Faults are scripted per call (:attr:`FakeAccounts.faults`, a :class:`Fault` per coming call): a 500 or
``invalid_grant`` that rotates nothing, a call that hangs until :attr:`FakeAccounts.release` is set
(or ``hang_seconds`` pass) and then drops the connection, and the worst one for a client: the
endpoint *rotates* (the refresh token is spent) and then the answer is lost (a 500, or the connection
dropped), so the new tokens exist nowhere but on the server. Every call is recorded
(:attr:`FakeAccounts.calls`); :meth:`FakeAccounts.revoked` names the families lost to reuse, and
:attr:`FakeAccounts.delivered` the newest refresh token each account's client actually received.

It also answers the usage endpoint per account, and can act as a model endpoint that accepts only
the newest, unexpired access token of an account (:meth:`FakeAccounts.model`), and that rejects
encrypted reasoning produced by another account (:meth:`FakeAccounts.reasoning_model`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import orjson
from aiohttp import web

from proxy.core.clock import Clock
from proxy.testing.fake_bodies import usage_payload
from proxy.testing.fake_upstream import FakeUpstream, Recorded, Responder, json_body, ok


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def fake_jwt(claims: dict[str, Any]) -> str:
    """An unsigned JWT (Codex only decodes the payload)."""
    return ".".join((_b64(b'{"alg":"none","typ":"JWT"}'), _b64(orjson.dumps(claims)), "sig"))


class Fault(Enum):
    """What the token endpoint does with one call instead of answering it normally."""

    ERROR = "500"  # 500; nothing rotated
    INVALID_GRANT = "invalid_grant"  # 400 invalid_grant; nothing rotated
    HANG = "hang"  # no answer until ``release`` is set (or ``hang_seconds`` pass), then the connection drops
    ROTATE_THEN_500 = "rotate_then_500"  # rotates (the refresh token is spent), then answers 500
    ROTATE_THEN_DROP = "rotate_then_drop"  # rotates, then drops the connection before any answer byte
    BAD_TOKENS = "bad_tokens"  # rotates and answers 200 with tokens that contain CR/LF and spaces


@dataclass(frozen=True, slots=True)
class Call:
    """One call of the token endpoint: the refresh token sent and what became of it."""

    refresh: str
    account: str | None  # the family the token belongs (or belonged) to; None for an unknown token
    generation: int | None  # the generation it redeemed (rotations only)
    outcome: str  # "rotated", "reused", "revoked", "invalid_grant", or the Fault's value


@dataclass
class _Family:
    account_id: str
    generation: int = 0
    refresh: str = ""
    access: str = ""
    expires: float = 0.0
    revoked: bool = False


@dataclass
class FakeAccounts:
    clock: Clock
    lifetime: float = 3600.0  # access token lifetime, seconds
    revoke_on_reuse: bool = True
    #: Force the next answers of the token endpoint: e.g. [503] makes the next call fail transiently.
    failures: list[int] = field(default_factory=list)
    usage: dict[str, tuple[float, float]] = field(default_factory=dict)  # account -> (primary %, secondary %)
    families: dict[str, _Family] = field(default_factory=dict)
    #: Faults for the coming calls, one per call, in order (after ``failures``).
    faults: list[Fault] = field(default_factory=list)
    #: A HANG fault lasts until this is set, or ``hang_seconds`` (when not None) have passed.
    release: asyncio.Event = field(default_factory=asyncio.Event)
    hang_seconds: float | None = None
    token_calls: list[tuple[str, int]] = field(default_factory=list)  # (account, generation redeemed)
    calls: list[Call] = field(default_factory=list)  # every call that carried a refresh token
    #: Per account, the newest refresh (and access) token a client received: a rotation whose answer was
    #: lost is not in it.
    delivered: dict[str, str] = field(default_factory=dict)
    delivered_access: dict[str, str] = field(default_factory=dict)
    reuse_errors: int = 0
    #: Set on each call that reached the token endpoint (tests wait on it instead of sleeping).
    called: asyncio.Event = field(default_factory=asyncio.Event)
    _dead: dict[str, str] = field(default_factory=dict)  # spent refresh token -> account
    _issued: dict[str, tuple[str, float]] = field(default_factory=dict)  # access token -> (account, expiry)
    _serial: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def install(self, fake: FakeUpstream) -> None:
        fake.control_routes["/oauth/token"] = self.token_endpoint
        fake.control_routes["/wham/usage"] = self.usage_endpoint

    def add(self, account_id: str, label: str | None = None, expires_in: float | None = None) -> dict[str, Any]:
        """A new account; returns its credentials-file entry."""
        family = self.families[account_id] = _Family(account_id)
        self._issue(family, expires_in)
        self.delivered[account_id] = family.refresh
        self.delivered_access[account_id] = family.access
        return self.entry(account_id, label)

    def entry(self, account_id: str, label: str | None = None) -> dict[str, Any]:
        family = self.families[account_id]
        doc: dict[str, Any] = {
            "type": "oauth",
            "access": family.access,
            "refresh": family.refresh,
            "expires": int(family.expires * 1000),
            "accountId": account_id,
        }
        if label:
            doc["label"] = label
        return doc

    def expire(self, account_id: str) -> None:
        """Make the account's current access token expired (server side)."""
        self.families[account_id].expires = self.clock.time() - 1

    def _issue(self, family: _Family, expires_in: float | None = None) -> None:
        n = next(self._serial)
        family.generation += 1
        family.refresh = f"rt-{family.account_id}-g{family.generation}-{n}"
        family.expires = self.clock.time() + (self.lifetime if expires_in is None else expires_in)
        family.access = fake_jwt(
            {
                "iat": int(self.clock.time()),
                "exp": int(family.expires),
                "n": n,
                "https://api.openai.com/auth": {"chatgpt_account_id": family.account_id, "chatgpt_plan_type": "plus"},
                "email": f"{family.account_id}@example.test",
            }
        )
        self._issued[family.access] = (family.account_id, family.expires)

    def valid_access(self, token: str | None, newest_only: bool = True) -> str | None:
        """The account whose newest (or, with ``newest_only=False``, any), unexpired access token this is."""
        if newest_only:
            for family in self.families.values():
                if not family.revoked and token == family.access and self.clock.time() < family.expires:
                    return family.account_id
            return None
        account, expires = self._issued.get(token or "", ("", 0.0))
        owner = self.families.get(account)
        if owner is None or owner.revoked or self.clock.time() >= expires:
            return None
        return account

    def revoked(self) -> list[str]:
        """The accounts whose whole token family was revoked (a refresh token was redeemed twice)."""
        return sorted(f.account_id for f in self.families.values() if f.revoked)

    def calls_with(self, refresh: str) -> int:
        """How many calls sent this refresh token."""
        return sum(1 for call in self.calls if call.refresh == refresh)

    def calls_per_generation(self) -> dict[tuple[str, int], int]:
        counts: dict[tuple[str, int], int] = {}
        for key in self.token_calls:
            counts[key] = counts.get(key, 0) + 1
        return counts

    async def token_endpoint(self, request: web.Request, recorded: Recorded, fake: FakeUpstream) -> web.StreamResponse:
        if self.failures:
            status = self.failures.pop(0)
            return await json_body(status, {"error": {"code": "server_error"}})(request, recorded, fake)
        try:
            doc = orjson.loads(recorded.body)
        except orjson.JSONDecodeError:
            doc = {}
        token = doc.get("refresh_token") if isinstance(doc, dict) else None
        if not isinstance(doc, dict) or doc.get("grant_type") != "refresh_token" or not isinstance(token, str):
            return await json_body(400, {"error": {"code": "invalid_request"}})(request, recorded, fake)
        self.called.set()
        fault = self.faults.pop(0) if self.faults else None
        family = next((f for f in self.families.values() if token == f.refresh), None)
        account = family.account_id if family is not None else self._dead.get(token)
        if fault in (Fault.ERROR, Fault.INVALID_GRANT, Fault.HANG):
            self.calls.append(Call(token, account, None, fault.value))
            if fault is Fault.HANG:
                return await self._hang(request)
            if fault is Fault.ERROR:
                return await json_body(500, {"error": {"code": "server_error"}})(request, recorded, fake)
            return await _error(400, "invalid_grant")(request, recorded, fake)
        if family is not None:
            if family.revoked:
                self.calls.append(Call(token, account, None, "revoked"))
                return await _error(401, "refresh_token_invalidated")(request, recorded, fake)
            redeemed = family.generation
            self.token_calls.append((family.account_id, redeemed))
            self._dead[token] = family.account_id
            self._issue(family)
            self.calls.append(Call(token, account, redeemed, fault.value if fault is not None else "rotated"))
            if fault is Fault.ROTATE_THEN_500:
                return await json_body(500, {"error": {"code": "server_error"}})(request, recorded, fake)
            if fault is Fault.ROTATE_THEN_DROP:
                _abort(request)
                return web.Response(status=200)
            body = {
                "access_token": family.access,
                "refresh_token": family.refresh,
                "id_token": family.access,
                "expires_in": int(self.lifetime),
            }
            if fault is Fault.BAD_TOKENS:
                body["refresh_token"] = family.refresh + "\r\nx-injected: 1"
                body["access_token"] = family.access + " trailing"
            else:
                self.delivered[family.account_id] = family.refresh
                self.delivered_access[family.account_id] = family.access
            return web.Response(body=orjson.dumps(body), content_type="application/json")
        if account is not None:
            self.reuse_errors += 1
            self.calls.append(Call(token, account, None, "reused"))
            if self.revoke_on_reuse:
                self.families[account].revoked = True
            return await _error(401, "refresh_token_reused")(request, recorded, fake)
        self.calls.append(Call(token, None, None, "invalid_grant"))
        return await _error(400, "invalid_grant")(request, recorded, fake)

    async def _hang(self, request: web.Request) -> web.StreamResponse:
        """Say nothing until released (or ``hang_seconds`` pass), then drop the connection."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.release.wait(), self.hang_seconds)
        _abort(request)
        return web.Response(status=200)

    async def usage_endpoint(self, request: web.Request, recorded: Recorded, fake: FakeUpstream) -> web.StreamResponse:
        account = self.valid_access(recorded.token)
        if account is None:
            return await json_body(401, {"detail": "unauthorized"})(request, recorded, fake)
        primary, secondary = self.usage.get(account, (10.0, 5.0))
        body = usage_payload(primary, secondary, now=self.clock.time())
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    def model(self, newest_only: bool = True) -> Responder:
        """A model endpoint that answers 401 unless the bearer is a valid access token.

        ``newest_only``: only the account's newest one (strict); otherwise any unexpired access token of a
        family that was not revoked (as a JWT is: valid until its ``exp``).
        """

        async def respond(request: web.Request, recorded: Recorded, fake: FakeUpstream) -> web.StreamResponse:
            if self.valid_access(recorded.token, newest_only) is None:
                return await _error(401, "token_expired")(request, recorded, fake)
            return await ok()(request, recorded, fake)

        return respond

    def reasoning_model(self) -> Responder:
        """A Codex backend that returns encrypted reasoning bound to the account and rejects foreign ciphertext."""

        async def respond(request: web.Request, recorded: Recorded, fake: FakeUpstream) -> web.StreamResponse:
            account = recorded.header("chatgpt-account-id")
            doc = recorded.json() if recorded.body else {}
            for item in doc.get("input", []) if isinstance(doc, dict) else []:
                foreign = isinstance(item, dict) and item.get("encrypted_content") != f"enc:{account}"
                if foreign and item.get("type") == "reasoning":
                    body = {
                        "error": {
                            "type": "invalid_request_error",
                            "code": "invalid_encrypted_content",
                            "message": "The encrypted content could not be verified.",
                        }
                    }
                    return await json_body(400, body)(request, recorded, fake)
            if isinstance(doc, dict) and doc.get("previous_response_id"):
                body = {"error": {"code": "previous_response_not_found", "message": "Previous response not found."}}
                return await json_body(400, body)(request, recorded, fake)
            reasoning = {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": f"enc:{account}"}
            answer = {"id": fake.next_id("resp"), "object": "response", "status": "completed", "output": [reasoning]}
            return web.Response(body=orjson.dumps(answer), content_type="application/json")

        return respond


def _error(status: int, code: str) -> Responder:
    return json_body(status, {"error": {"code": code, "message": code.replace("_", " ")}})


def _abort(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()
