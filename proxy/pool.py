"""The pool: every credential of every provider, and its mutable state.

This is the one owner of mutable credential state (blocked until when and why, disabled, counters).
Reads on the request path are plain dictionary lookups, no awaits; changes are reported to
``listeners`` so that persistence and metrics can follow without the pool knowing about them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from proxy import selection
from proxy.clock import Clock
from proxy.config import Provider
from proxy.credentials import Credential
from proxy.errors import NoCredentialAvailable
from proxy.limits import Verdict
from proxy.usage import UsageSnapshot


@dataclass(slots=True)
class CredentialState:
    blocked_until: float = 0.0
    block_reason: str = ""
    attention: bool = False  # a human must act (billing, plan, re-login)
    # Why the credential is out of rotation until a human acts ("invalid_api_key", "needs_relogin"); "" when enabled.
    disabled: str = ""
    consecutive_limits: int = 0
    served: int = 0
    last_error: str = ""
    usage: UsageSnapshot | None = None  # the latest usage windows seen (Codex accounts)


Listener = Callable[[Credential, CredentialState], None]


class Pool:
    def __init__(
        self,
        providers: Iterable[Provider],
        credentials: Mapping[str, Sequence[Credential]],
        clock: Clock,
    ) -> None:
        self._clock = clock
        self._providers = {p.name: p for p in providers}
        self._state: dict[str, CredentialState] = {}
        self._groups: dict[str, tuple[tuple[tuple[Credential, ...], tuple[str, ...]], ...]] = {}
        self._counters: dict[str, int] = {}
        self._by_label: dict[str, Credential] = {}
        self.listeners: list[Listener] = []
        for name in self._providers:
            self.replace(name, credentials.get(name, ()))

    def replace(self, provider: str, creds: Sequence[Credential]) -> None:
        """Install the credentials of ``provider``; state is kept for every id that stays."""
        keys = tuple(c for c in creds if c.kind == "api_key")
        oauth = tuple(c for c in creds if c.kind == "oauth")
        self._groups[provider] = tuple((group, tuple(c.id for c in group)) for group in (keys, oauth) if group)
        self._counters.setdefault(provider, 0)
        for label, cred in list(self._by_label.items()):
            if cred.provider == provider:
                del self._by_label[label]
        for cred in creds:
            self._state.setdefault(cred.id, CredentialState())
            self._by_label[cred.label] = cred

    def providers(self) -> Iterable[Provider]:
        return self._providers.values()

    def credentials(self, provider: str) -> list[Credential]:
        return [c for group, _ in self._groups.get(provider, ()) for c in group]

    def by_label(self, label: str) -> Credential | None:
        return self._by_label.get(label)

    def secrets(self) -> list[str]:
        """Every token value in the pool, for the log redaction filter."""
        values = []
        for group in self._groups.values():
            for creds, _ in group:
                for cred in creds:
                    values.append(cred.token.reveal())
                    if cred.refresh is not None:
                        values.append(cred.refresh.reveal())
        return values

    def state(self, cred: Credential) -> CredentialState:
        return self._state[cred.id]

    def order(self, provider: str, session_id: str | None) -> list[Credential]:
        """Every credential of ``provider`` in the order this request should try them."""
        selector = self._providers[provider].selector
        counter = 0
        if session_id is None:
            counter = self._counters[provider]
            self._counters[provider] = counter + 1
        result: list[Credential] = []
        for group, ids in self._groups[provider]:
            result.extend(group[i] for i in selection.order(session_id, ids, selector, counter))
        return result

    def available(self, cred: Credential, now: float) -> bool:
        state = self._state[cred.id]
        return not state.disabled and state.blocked_until <= now

    def block(self, cred: Credential, verdict: Verdict) -> None:
        """Block ``cred`` until ``verdict.until``; a new block never shortens an existing one."""
        state = self._state[cred.id]
        now = self._clock.time()
        if verdict.until > state.blocked_until:
            state.blocked_until = verdict.until
            state.block_reason = verdict.reason
        elif state.blocked_until <= now:
            state.block_reason = verdict.reason
        state.attention = state.attention or verdict.attention
        state.consecutive_limits += 1
        state.last_error = verdict.reason
        self._changed(cred, state)

    def disable(self, cred: Credential, reason: str) -> None:
        state = self._state[cred.id]
        state.disabled = reason
        state.attention = True
        state.last_error = reason
        self._changed(cred, state)

    def succeeded(self, cred: Credential) -> None:
        state = self._state[cred.id]
        state.served += 1
        if state.consecutive_limits:
            state.consecutive_limits = 0
        if state.attention and not state.disabled and state.blocked_until <= self._clock.time():
            state.attention = False
            self._changed(cred, state)

    def failed(self, cred: Credential, reason: str) -> None:
        """Record an error that does not change the credential's availability."""
        self._state[cred.id].last_error = reason

    def unblock(self, cred: Credential) -> None:
        """Put ``cred`` back in rotation now (admin action)."""
        state = self._state[cred.id]
        state.blocked_until = 0.0
        state.block_reason = ""
        state.disabled = ""
        state.attention = False
        state.consecutive_limits = 0
        self._changed(cred, state)

    def unavailable(self, provider: str) -> NoCredentialAvailable:
        """The error for "nothing can serve ``provider`` now": 429 with a retry time, or 503."""
        creds = self.credentials(provider)
        waits = [self._state[c.id].blocked_until for c in creds if not self._state[c.id].disabled]
        if not creds:
            return NoCredentialAvailable(provider, None, f"no credentials are configured for provider {provider!r}")
        if not waits:
            return NoCredentialAvailable(
                provider, None, f"every credential of provider {provider!r} is disabled or needs a re-login"
            )
        return NoCredentialAvailable(provider, min(waits), f"every credential of provider {provider!r} is rate limited")

    def _changed(self, cred: Credential, state: CredentialState) -> None:
        for listener in self.listeners:
            listener(cred, state)
