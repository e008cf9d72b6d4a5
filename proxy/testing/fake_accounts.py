"""Fake ChatGPT accounts for tests and the demo: an OAuth token endpoint that behaves like OpenAI's.

:class:`FakeAccounts` plugs into a :class:`~proxy.testing.fake_upstream.FakeUpstream` (``install``). It issues
unsigned JWT access tokens (with ``exp`` and the account-id claim, as Codex reads them) and refresh
tokens that **rotate and are single-use**: redeeming a refresh token returns a new one and kills the
old; redeeming a dead one answers ``refresh_token_reused`` and, like OpenAI may, revokes the whole
family (every later refresh of that account answers ``refresh_token_invalidated``). It counts token
calls per refresh-token generation, so tests can assert "exactly one call per generation".

It also answers the usage endpoint per account, and can act as a model endpoint that accepts only
the newest, unexpired access token of an account (:meth:`FakeAccounts.model`), and that rejects
encrypted reasoning produced by another account (:meth:`FakeAccounts.reasoning_model`).
"""

from __future__ import annotations

import base64
import itertools
from dataclasses import dataclass, field
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
    token_calls: list[tuple[str, int]] = field(default_factory=list)  # (account, generation redeemed)
    reuse_errors: int = 0
    _dead: dict[str, str] = field(default_factory=dict)  # spent refresh token -> account
    _serial: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def install(self, fake: FakeUpstream) -> None:
        fake.control_routes["/oauth/token"] = self.token_endpoint
        fake.control_routes["/wham/usage"] = self.usage_endpoint

    def add(self, account_id: str, label: str | None = None, expires_in: float | None = None) -> dict[str, Any]:
        """A new account; returns its credentials-file entry."""
        family = self.families[account_id] = _Family(account_id)
        self._issue(family, expires_in)
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
                "exp": int(family.expires),
                "n": n,
                "https://api.openai.com/auth": {"chatgpt_account_id": family.account_id, "chatgpt_plan_type": "plus"},
                "email": f"{family.account_id}@example.test",
            }
        )

    def valid_access(self, token: str | None) -> str | None:
        """The account whose newest, unexpired access token this is, or ``None``."""
        for family in self.families.values():
            if not family.revoked and token == family.access and self.clock.time() < family.expires:
                return family.account_id
        return None

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
        for family in self.families.values():
            if token == family.refresh:
                if family.revoked:
                    return await _error(401, "refresh_token_invalidated")(request, recorded, fake)
                self.token_calls.append((family.account_id, family.generation))
                self._dead[token] = family.account_id
                self._issue(family)
                body = {
                    "access_token": family.access,
                    "refresh_token": family.refresh,
                    "id_token": family.access,
                    "expires_in": int(self.lifetime),
                }
                return web.Response(body=orjson.dumps(body), content_type="application/json")
        account = self._dead.get(token)
        if account is not None:
            self.reuse_errors += 1
            if self.revoke_on_reuse:
                self.families[account].revoked = True
            return await _error(401, "refresh_token_reused")(request, recorded, fake)
        return await _error(400, "invalid_grant")(request, recorded, fake)

    async def usage_endpoint(self, request: web.Request, recorded: Recorded, fake: FakeUpstream) -> web.StreamResponse:
        account = self.valid_access(recorded.token)
        if account is None:
            return await json_body(401, {"detail": "unauthorized"})(request, recorded, fake)
        primary, secondary = self.usage.get(account, (10.0, 5.0))
        body = usage_payload(primary, secondary, now=self.clock.time())
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    def model(self) -> Responder:
        """A model endpoint that answers 401 unless the bearer is a valid, current access token."""

        async def respond(request: web.Request, recorded: Recorded, fake: FakeUpstream) -> web.StreamResponse:
            if self.valid_access(recorded.token) is None:
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
