"""The pool: every credential of every provider, and its mutable state.

This is the one owner of mutable credential state (blocked until when and why, disabled, usage,
counters). Reads on the request path are plain dictionary lookups, no awaits; changes are reported
to ``listeners`` (persistence, shared state, metrics follow without the pool knowing about them),
and views from other processes come back through :meth:`Pool.apply`, merged by
:func:`proxy.core.credential_state.merge`.

**Time.** A block's end is kept twice: ``blocked_until``, the wall-clock epoch second it was
announced for (what the state file and Redis hold and other processes merge), and
``block_deadline``, a deadline on the monotonic clock (what this process decides with). A block is
over when either has passed: a wall clock that steps back (NTP, a VM restored) cannot lengthen it,
and one that steps forward (a suspend, which the monotonic clock does not count) can only end it
early (reliability F37). Views from elsewhere are converted at the boundary (:meth:`Pool.apply`,
:func:`proxy.core.credential_state.remaining`); a copy of a block this process holds or held is
recognised by its (start, end) and never converted again, so the state file handing back an
old-clock copy of our own block cannot start it over. What is shown (status, metrics, Retry-After)
comes from :meth:`Pool.view`: the end on today's wall clock.

It also remembers, for recent sessions, which credential served them last: that tells a new session
from a returning one (the soft limit steers only new sessions) and a session that switches accounts
(whose account-bound state must be dropped).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from proxy.config import Provider
from proxy.core import selection
from proxy.core.clock import Clock
from proxy.core.credential_state import EMPTY, Entry, merge, remaining
from proxy.core.credentials import Credential
from proxy.core.ratelimits import Kind, Verdict
from proxy.core.secret import public_code
from proxy.core.usage import UsageSnapshot, exhausted_until, highest_percent
from proxy.errors import NoCredentialAvailable

#: How many sessions the pool remembers (least recently used are forgotten).
MAX_SESSIONS = 10_000
#: Blocks remembered per credential, to recognise copies of them coming back from the state file or Redis.
KNOWN_BLOCKS = 8


@dataclass(slots=True)
class CredentialState:
    """One credential's state in this process: its :class:`Entry` (blocked, disabled, usage: the part that
    is persisted and shared with other processes, replaced whole on each change), the block's end on
    this process's monotonic clock, and counters that stay in this process. The properties read the
    entry; only the pool changes either."""

    entry: Entry = EMPTY
    block_deadline: float = 0.0  # the block's end on the monotonic clock: what this process decides with
    consecutive_limits: int = 0
    served: int = 0
    last_error: str = ""

    @property
    def blocked_until(self) -> float:
        """The block's end in wall-clock epoch seconds, as persisted and shared."""
        return self.entry.blocked_until

    @property
    def blocked_since(self) -> float:
        return self.entry.blocked_since

    @property
    def block_reason(self) -> str:
        return self.entry.reason

    @property
    def attention(self) -> bool:
        """A human must act: billing or plan (a flagged block), or a disable (invalid key, re-login)."""
        return self.entry.attention or bool(self.entry.disabled)

    @property
    def disabled(self) -> str:
        """Why it is out of rotation until a human acts ("invalid_api_key", "needs_relogin"); "" when enabled."""
        return self.entry.disabled

    @property
    def disabled_since(self) -> float:
        return self.entry.disabled_since

    @property
    def disabled_token(self) -> str:
        """Fingerprint of the token the disable was raised for."""
        return self.entry.disabled_token

    @property
    def unblocked_at(self) -> float:
        return self.entry.unblocked_at

    @property
    def usage(self) -> UsageSnapshot | None:
        """The latest usage windows seen (Codex accounts, Anthropic keys)."""
        return self.entry.usage


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
        self._by_id: dict[str, Credential] = {}
        self._sessions: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._secrets: tuple[str, ...] | None = None
        self._known: dict[str, deque[tuple[float, float]]] = {}  # id -> (since, until) of its latest blocks
        self.listeners: list[Listener] = []
        for name in self._providers:
            self.replace(name, credentials.get(name, ()))

    # The credentials -------------------------------------------------------------------------

    def replace(self, provider: str, creds: Sequence[Credential]) -> None:
        """Install the credentials of ``provider`` (start-up, or the file changed); state is kept by id."""
        keys = tuple(c for c in creds if c.kind == "api_key")
        oauth = tuple(c for c in creds if c.kind == "oauth")
        self._groups[provider] = tuple((group, tuple(c.id for c in group)) for group in (keys, oauth) if group)
        self._counters.setdefault(provider, 0)
        self._secrets = None
        for mapping in (self._by_label, self._by_id):
            for key, cred in list(mapping.items()):
                if cred.provider == provider:
                    del mapping[key]
        for cred in creds:
            state = self._state.setdefault(cred.id, CredentialState())
            self._by_label[cred.label] = cred
            self._by_id[cred.id] = cred
            self._check_disabled_token(cred, state)

    def update(self, cred: Credential) -> None:
        """Swap in new tokens for a credential already in the pool (after a refresh)."""
        provider = cred.provider
        self._groups[provider] = tuple(
            (tuple(cred if c.id == cred.id else c for c in group), ids) for group, ids in self._groups[provider]
        )
        self._by_label[cred.label] = cred
        self._by_id[cred.id] = cred
        self._secrets = None
        self._check_disabled_token(cred, self._state[cred.id])

    def _check_disabled_token(self, cred: Credential, state: CredentialState) -> None:
        # A flag raised for an older token (before a re-login or a new key) no longer applies.
        entry = state.entry
        if entry.disabled and entry.disabled_token and entry.disabled_token != cred.fingerprint:
            attention = entry.attention and self._left(state) > 0
            state.entry = replace(entry, disabled="", disabled_since=0.0, disabled_token="", attention=attention)

    def providers(self) -> Iterable[Provider]:
        return self._providers.values()

    def provider(self, name: str) -> Provider:
        return self._providers[name]

    def credentials(self, provider: str) -> list[Credential]:
        return [c for group, _ in self._groups.get(provider, ()) for c in group]

    def all_credentials(self) -> list[Credential]:
        return [c for name in self._providers for c in self.credentials(name)]

    def by_label(self, label: str) -> Credential | None:
        return self._by_label.get(label)

    def by_id(self, cred_id: str) -> Credential | None:
        return self._by_id.get(cred_id)

    def current(self, cred: Credential) -> Credential:
        """The pool's version of ``cred`` (its tokens may have been refreshed since it was picked)."""
        return self._by_id.get(cred.id, cred)

    def secrets(self) -> tuple[str, ...]:
        """Every token value in the pool, for the log redaction filter (made again only after a change)."""
        if self._secrets is None:
            values = []
            for cred in self._by_id.values():
                values.append(cred.token.reveal())
                if cred.refresh is not None:
                    values.append(cred.refresh.reveal())
            self._secrets = tuple(values)
        return self._secrets

    def state(self, cred: Credential) -> CredentialState:
        return self._state[cred.id]

    def view(self, cred: Credential) -> CredentialState:
        """``cred``'s state as shown: ``blocked_until`` is when its block ends on today's wall clock (0: ended)."""
        state = self._state[cred.id]
        entry = state.entry
        if not entry.blocked_until:
            return state
        now, mono = self._clock.time(), self._clock.monotonic()
        left_wall, left_mono = entry.blocked_until - now, state.block_deadline - mono
        if min(left_wall, left_mono) <= 0:
            return replace(state, entry=replace(entry, blocked_until=0.0))
        if left_wall <= left_mono:
            return state
        return replace(state, entry=replace(entry, blocked_until=now + left_mono))

    def entry(self, cred: Credential) -> Entry:
        """What to persist and share of ``cred``'s state: a block that has ended here is left out."""
        state = self._state[cred.id]
        entry = state.entry
        return entry if self._left(state) > 0 or not entry.blocked_until else _without_block(entry)

    def _left(self, state: CredentialState) -> float:
        """Seconds until the block ends (0 or less: not blocked); the earlier of its two clocks."""
        until = state.entry.blocked_until
        if not until:
            return 0.0
        return min(until - self._clock.time(), state.block_deadline - self._clock.monotonic())

    def _remember(self, cred_id: str, state: CredentialState) -> None:
        known = self._known.setdefault(cred_id, deque(maxlen=KNOWN_BLOCKS))
        block = (state.blocked_since, state.blocked_until)
        if block not in known:
            known.append(block)

    # Selection -------------------------------------------------------------------------------

    def order(self, provider: str, session_id: str | None, advance: bool = True) -> list[Credential]:
        """Every credential of ``provider`` in the order this request should try them.

        ``advance=False`` only looks (``credproxy which``): the round-robin counter stays where it is.
        """
        config = self._providers[provider]
        counter = 0
        if session_id is None:
            counter = self._counters[provider]
            if advance:
                self._counters[provider] = counter + 1
        result: list[Credential] = []
        for group, ids in self._groups[provider]:
            result.extend(group[i] for i in selection.order(session_id, ids, config.selector, counter))
        if config.soft_limit_percent is not None and len(result) > 1 and self.last_served(provider, session_id) is None:
            # A new session goes to a credential with headroom while there is one (stable partition).
            limit = config.soft_limit_percent
            roomy = [c for c in result if highest_percent(self._state[c.id].usage) < limit]
            if roomy and len(roomy) < len(result):
                result = roomy + [c for c in result if highest_percent(self._state[c.id].usage) >= limit]
        return result

    def last_served(self, provider: str, session_id: str | None) -> str | None:
        """The id of the credential that last served this session, if the pool remembers it."""
        if session_id is None:
            return None
        return self._sessions.get((provider, session_id))

    def available(self, cred: Credential, now: float) -> bool:
        """Not disabled, and not blocked at wall-clock time ``now`` or by the block's monotonic deadline."""
        state = self._state[cred.id]
        entry = state.entry
        if entry.disabled:
            return False
        return entry.blocked_until <= now or state.block_deadline <= self._clock.monotonic()

    # Outcomes --------------------------------------------------------------------------------

    def block(self, cred: Credential, verdict: Verdict) -> None:
        """Block ``cred`` until ``verdict.until``; a new block never shortens an existing one."""
        state = self._state[cred.id]
        entry = state.entry
        now = self._clock.time()
        current = self._left(state)
        if verdict.until - now > current:
            # A new block (or one dated before a clock step back) starts now; a longer one keeps its start.
            since = now if current <= 0 or entry.blocked_since > now else entry.blocked_since
            reason = public_code(verdict.reason, self.secrets())
            state.entry = entry = replace(entry, blocked_until=verdict.until, blocked_since=since, reason=reason)
            state.block_deadline = self._clock.monotonic() + (verdict.until - now)
            self._remember(cred.id, state)
        if verdict.attention and not entry.attention:
            state.entry = replace(entry, attention=True)
        state.consecutive_limits += 1
        state.last_error = public_code(verdict.reason, self.secrets())
        self._changed(cred, state)

    def disable(self, cred: Credential, reason: str) -> None:
        state = self._state[cred.id]
        state.entry = replace(
            state.entry, disabled=reason, disabled_since=self._clock.time(), disabled_token=cred.fingerprint
        )
        state.last_error = public_code(reason, self.secrets())
        self._changed(cred, state)

    def record_usage(self, cred: Credential, snapshot: UsageSnapshot, block: bool = True) -> None:
        """Take in a usage snapshot; an exhausted account is blocked until its window resets (if ``block``)."""
        state = self._state[cred.id]
        if state.usage is not None and state.usage.observed_at > snapshot.observed_at:
            return
        state.entry = state.entry.with_usage(snapshot)
        now = self._clock.time()
        until = exhausted_until(snapshot, now) if block else None
        if until is not None and until - now > self._left(state):
            self.block(cred, Verdict(Kind.LIMITED, reason="usage_exhausted", until=until, source=snapshot.source))
            return
        self._changed(cred, state)

    def succeeded(self, cred: Credential, session_id: str | None = None) -> None:
        state = self._state[cred.id]
        state.served += 1
        state.consecutive_limits = 0
        if session_id is not None:
            key = (cred.provider, session_id)
            self._sessions[key] = cred.id
            self._sessions.move_to_end(key)
            if len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
        entry = state.entry
        if entry.attention and not entry.disabled and self._left(state) <= 0:
            state.entry = replace(entry, attention=False)
            self._changed(cred, state)

    def failed(self, cred: Credential, reason: str) -> None:
        """Record an error that does not change the credential's availability (as a code: see ``public_code``)."""
        self._state[cred.id].last_error = public_code(reason, self.secrets())

    def unblock(self, cred: Credential) -> None:
        """Put ``cred`` back in rotation now (admin action); wins over older blocks elsewhere too."""
        state = self._state[cred.id]
        state.entry = Entry(unblocked_at=self._clock.time(), usage=state.entry.usage)
        state.block_deadline = 0.0
        state.consecutive_limits = 0
        self._changed(cred, state)

    def apply(self, cred_id: str, remote: Entry) -> bool:
        """Merge another process's view of a credential into ours; True when ours changed."""
        state = self._state.get(cred_id)
        cred = self._by_id.get(cred_id)
        if state is None or cred is None:
            return False
        if remote.disabled and remote.disabled_token and remote.disabled_token != cred.fingerprint:
            remote = replace(remote, disabled="", disabled_since=0.0, disabled_token="")
        if remote.blocked_until and (remote.blocked_since, remote.blocked_until) in self._known.get(cred_id, ()):
            remote = _without_block(remote)  # a copy of a block we hold or held: nothing new in it
        before = state.entry
        merged = merge(self.entry(cred), remote)
        if merged == before:
            return False
        if not merged.blocked_until:
            state.block_deadline = 0.0
        elif (merged.blocked_since, merged.blocked_until) != (before.blocked_since, before.blocked_until):
            state.block_deadline = self._clock.monotonic() + remaining(merged, self._clock.time())
        state.entry = merged
        if merged.blocked_until:
            self._remember(cred_id, state)
        return True

    def unavailable(self, provider: str) -> NoCredentialAvailable:
        """The error for "nothing can serve ``provider`` now": 429 with a retry time, or 503."""
        creds = self.credentials(provider)
        waits = [self.view(c).blocked_until for c in creds if not self._state[c.id].entry.disabled]
        if not creds:
            return NoCredentialAvailable(provider, None, f"no credentials are configured for provider {provider!r}")
        if not waits:
            return NoCredentialAvailable(
                provider, None, f"every credential of provider {provider!r} is disabled or needs a re-login"
            )
        soonest = min(waits)
        if soonest <= self._clock.time():
            # None is blocked: they were skipped for now (an expired token whose refresh cannot run yet).
            detail = f"no credential of provider {provider!r} can serve right now (a token refresh is pending)"
            return NoCredentialAvailable(provider, soonest, detail)
        return NoCredentialAvailable(provider, soonest, f"every credential of provider {provider!r} is rate limited")

    def _changed(self, cred: Credential, state: CredentialState) -> None:
        for listener in self.listeners:
            listener(cred, state)


def _without_block(entry: Entry) -> Entry:
    return replace(entry, blocked_until=0.0, blocked_since=0.0, reason="", attention=False)
