"""Failover on a Responses WebSocket: the decisions of one client socket, as events in and commands out.

Theory of operation
-------------------
A client socket is bridged to one upstream socket at a time, opened with one credential. The client
sends ``response.create`` frames; the upstream answers each with a stream of event frames. The bridge
(``proxy.edge.websocket``) reads frames and tells a :class:`SocketPlan` what happened; the plan answers
with commands (relay this frame, block that credential, open a socket elsewhere, send this request
there, close the client) and the bridge carries them out in order. The plan does no I/O and reads no
clock: ``now`` comes with each event.

What a server frame means depends on where the response in flight is (:class:`Phase`) and on what the
frame says (:class:`Frame`); :data:`TABLE` is the one place that maps the pair to a :class:`Step`:

=========  =======================  ============================================================
phase      frame                    step (next phase)
=========  =======================  ============================================================
awaiting   limit                    FAILOVER: block the credential; the request moves to the next
                                    one on a new upstream socket (awaiting)
awaiting   usage (rate limits)      HOLD until the response commits; dropped on a failover
awaiting   end (completed, failed,  RELAY (idle)
           incomplete, error)
awaiting   event                    RELAY, held frames first: the response is committed (streaming)
streaming  limit                    RELAY_BLOCK: the client has part of this answer, so it gets the
                                    rest as it is; the credential is blocked for later ones (idle)
streaming  end                      RELAY (idle)
streaming  usage, event             RELAY (streaming)
idle       limit                    DROP: block the credential and close its socket without a word;
                                    the next request opens one on the next credential (idle)
idle       usage, end, event        RELAY (idle)
=========  =======================  ============================================================

A *limit* is a frame that :func:`proxy.core.wsframes.verdict` classifies as limited (an error frame
saying 429 or a limit code, with the same reset hints as HTTP; a ``response.failed`` with a limit
code). Every other error, ``websocket_connection_limit_reached`` included, is passed on: Codex knows
what to do with it (reconnect, retry, or stop).

A FAILOVER moves the request to another credential. Each credential is tried at most once per
response: the plan asks for a socket on a credential it has not tried for this response
(:class:`Connect` with ``exclude``); the bridge chooses it as it chooses for HTTP and answers
:meth:`SocketPlan.connected` or :meth:`SocketPlan.exhausted`. The request goes there rebuilt as a full
request (:class:`~proxy.core.conversation.Conversation`): the new account knows nothing of the old
socket's responses. When it cannot be rebuilt exactly, or more than one request is in flight, the
client socket is closed with :data:`RECONNECT` instead: Codex then opens a new socket, which goes to
the next credential, and sends the full input itself (observed with Codex 0.171.0). When every
credential is limited the client gets the usage-limit frame (:class:`Exhausted`).

After a failover the socket stays on the new credential for the rest of the session. Nothing but a
limit blocks a credential: a client that closes its socket, an upstream that closes its own, a
network error, never do; an upstream close is passed on to the client (Codex reconnects lazily).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from proxy.core import wsframes
from proxy.core.conversation import Conversation
from proxy.core.credentials import Credential
from proxy.core.ratelimits import OK, Kind, Verdict
from proxy.core.replay import Block  # a limit's effect: carried out as the replay plan's are


class Phase(Enum):
    IDLE = "idle"  # no response in flight
    AWAITING = "awaiting"  # a request went upstream; nothing of its answer has reached the client
    STREAMING = "streaming"  # part of the answer reached the client


class Frame(Enum):
    LIMIT = "limit"  # the credential is limited
    USAGE = "usage"  # codex.rate_limits: usage windows, not part of the answer
    END = "end"  # the response in flight ends (completed, failed, incomplete, an error)
    EVENT = "event"  # any other event


class Step(Enum):
    RELAY = "relay"
    HOLD = "hold"
    FAILOVER = "failover"
    RELAY_BLOCK = "relay_block"
    DROP = "drop"


TABLE: dict[tuple[Phase, Frame], tuple[Step, Phase]] = {
    (Phase.AWAITING, Frame.LIMIT): (Step.FAILOVER, Phase.AWAITING),
    (Phase.AWAITING, Frame.USAGE): (Step.HOLD, Phase.AWAITING),
    (Phase.AWAITING, Frame.END): (Step.RELAY, Phase.IDLE),
    (Phase.AWAITING, Frame.EVENT): (Step.RELAY, Phase.STREAMING),
    (Phase.STREAMING, Frame.LIMIT): (Step.RELAY_BLOCK, Phase.IDLE),
    (Phase.STREAMING, Frame.USAGE): (Step.RELAY, Phase.STREAMING),
    (Phase.STREAMING, Frame.END): (Step.RELAY, Phase.IDLE),
    (Phase.STREAMING, Frame.EVENT): (Step.RELAY, Phase.STREAMING),
    (Phase.IDLE, Frame.LIMIT): (Step.DROP, Phase.IDLE),
    (Phase.IDLE, Frame.USAGE): (Step.RELAY, Phase.IDLE),
    (Phase.IDLE, Frame.END): (Step.RELAY, Phase.IDLE),
    (Phase.IDLE, Frame.EVENT): (Step.RELAY, Phase.IDLE),
}

#: The close that makes Codex open a new socket and send the full input (it does so after any close).
RECONNECT = (1012, "credproxy: reconnect to continue on another credential")
#: The close when no upstream socket could be opened for the response in flight.
UNAVAILABLE = (1011, "credproxy: the upstream refused the socket")
#: Closing an upstream socket the bridge no longer uses.
MOVED = (1000, "credproxy: the session moved to another credential")
#: Frames held while a response is awaited, beyond which the response is committed anyway.
MAX_HELD = 16


# Commands ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Relay:
    """Send these frames to the client, in order."""

    frames: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Forward:
    """Send this text frame to the current upstream socket."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Connect:
    """Open a new upstream socket on a credential whose id is not in ``exclude`` (the bridge chooses it);
    answer with :meth:`SocketPlan.connected` or :meth:`SocketPlan.exhausted`."""

    exclude: frozenset[str]


@dataclass(frozen=True, slots=True)
class CloseUpstream:
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class CloseClient:
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Exhausted:
    """No credential can serve the request: send the client the usage-limit frame."""


@dataclass(frozen=True, slots=True)
class Ended:
    """The response in flight ended, as ``status`` and ``outcome`` (for the access log and metrics);
    ``cred`` answered it (``None``: no credential did); ``reason``: the upstream's error code;
    ``tried``: the credentials it was sent to (or refused a socket); ``attempts``: upstream sends and
    socket openings."""

    status: int
    outcome: str
    cred: Credential | None
    reason: str = ""
    tried: tuple[Credential, ...] = ()
    attempts: int = 0


Command = Relay | Forward | Block | Connect | CloseUpstream | CloseClient | Exhausted | Ended
Commands = tuple[Command, ...]


@dataclass(slots=True)
class _Request:
    doc: Mapping[str, Any]
    data: bytes


class SocketPlan:
    """The decisions of one client socket (module docstring). Not thread-safe; one per client socket."""

    __slots__ = (
        "_answered_by",
        "_held",
        "_inflight",
        "_moving",
        "_waiting",
        "attempts",
        "conversation",
        "cred",
        "phase",
        "tried",
    )

    def __init__(self, cred: Credential | None, conversation: Conversation) -> None:
        """``cred``: the credential of the upstream socket opened with the handshake (``None``: none yet)."""
        self.cred = cred
        self.conversation = conversation
        self.phase = Phase.IDLE
        self.tried: list[Credential] = []  # credentials the response in flight was sent to
        self.attempts = 0  # upstream sends (and refused socket openings) for the response in flight
        self._answered_by = cred  # the credential of the latest upstream socket: the conversation's account
        self._inflight: deque[_Request] = deque()
        self._held: list[bytes] = []
        self._waiting: list[bytes] = []  # client frames for the socket being opened
        self._moving: bytes | None = None  # the request a failover rebuilt, for the socket being opened

    # Events from the client ----------------------------------------------------------------

    def request(self, doc: Mapping[str, Any], data: bytes, usable: bool = True) -> Commands:
        """The client sent a ``response.create`` (``doc``, parsed from ``data``). ``usable``: the socket's
        credential may serve now (it was not blocked meanwhile: by a limit late in an answer, over HTTP,
        by its usage, by another replica); if not, the request moves on as after a limit."""
        self.conversation.request(doc)
        self._inflight.append(_Request(doc, data))
        moved: Commands = ()
        if self.phase is Phase.IDLE:
            self.phase = Phase.AWAITING
            self.tried = []
            self.attempts = 0
            if self.cred is not None and not usable:
                self.cred = None
                moved = (CloseUpstream(*MOVED),)
        if self.cred is None:
            if moved:
                return (*moved, Connect(frozenset()))
            if len(self._inflight) > 1 or self._waiting:
                self._waiting.append(data)  # a socket is being opened: this follows the first request
                return ()
            return (Connect(frozenset()),)
        if len(self._inflight) == 1:
            self.tried.append(self.cred)
            self.attempts += 1
        return (Forward(data),)

    def other(self, data: bytes) -> Commands:
        """The client sent a frame that is not a ``response.create`` (another type, or not JSON)."""
        self.conversation.other_frame()
        if self.cred is None:
            self._waiting.append(data)
            return ()
        return (Forward(data),)

    def client_closed(self, code: int, reason: str, status: int = 499, outcome: str = "client_closed") -> Commands:
        """The client closed its socket (or it broke, or credproxy closes it: ``status`` and ``outcome``
        say why, for a response in flight): close the upstream one; nothing is blocked."""
        ended = self._end_all(status, outcome, None)
        if self.cred is None:
            return ended
        self.cred = None
        return (*ended, CloseUpstream(code, reason))

    # Events from the upstream ---------------------------------------------------------------

    def relays_unread(self) -> bool:
        """True when an event frame the plan would not read (a delta: not in ``wsframes.PARSED``) is
        relayed as it is without changing anything (``TABLE[(phase, EVENT)]`` is RELAY to the same
        phase): the bridge may then send it without calling :meth:`frame`, as it does for most frames."""
        return self.phase is not Phase.AWAITING

    def frame(self, data: bytes, kind: str, doc: Mapping[str, Any] | None, now: float, consecutive: int) -> Commands:
        """A server frame of the current upstream socket. ``kind``: its type; ``doc``: the frame parsed,
        when its type is one of :data:`proxy.core.wsframes.PARSED` (else ``None``)."""
        cred = self.cred
        assert cred is not None, "a frame from no socket"
        frame, found = self._sort(kind, doc, now, consecutive)
        step, phase = TABLE[(self.phase, frame)]
        if step is Step.HOLD:
            if len(self._held) < MAX_HELD:
                self._held.append(data)
                return ()
            step, phase = Step.RELAY, Phase.STREAMING  # too much to hold: commit
        if step is Step.FAILOVER:
            return self._failover(cred, found)
        if step is Step.DROP:
            self.cred = None
            return (Block(cred, found), CloseUpstream(*MOVED))
        before, self.phase = self.phase, phase
        held, self._held = self._held, []
        commands: list[Command] = [Relay((*held, data))]
        if step is Step.RELAY_BLOCK:
            commands.insert(0, Block(cred, found))
        if doc is not None:
            self._note(kind, doc)
        if before is not Phase.IDLE and phase is Phase.IDLE:
            commands.extend(self._finish(kind, doc, found, cred))
        return tuple(commands)

    def upstream_closed(self, code: int, reason: str) -> Commands:
        """The upstream closed its socket (or the connection broke): pass it on, block nothing."""
        ended = self._end_all(502, "upstream_closed", self.cred)
        self.cred = None
        return (*ended, CloseClient(*client_close(code, reason)))

    # Answers to Connect -------------------------------------------------------------------

    def connected(self, cred: Credential, tried: list[Credential]) -> Commands:
        """A new upstream socket is open on ``cred``; ``tried``: every credential the opening tried
        (refused ones included, ``cred`` last)."""
        other = self._answered_by is not None and self._answered_by.id != cred.id
        self.cred = self._answered_by = cred
        self.conversation.new_socket()
        self.tried.extend(c for c in tried if c not in self.tried)
        self.attempts += len(tried)
        waiting, self._waiting = self._waiting, []
        if not self._inflight:
            return tuple(Forward(d) for d in waiting)
        head = self._inflight[0]
        moving, self._moving = self._moving, None
        if other or not self.conversation.on_socket(head.doc):
            full = moving if moving is not None and other else self.conversation.full_request(head.doc, other)
            if full is None:
                return self._reconnect(None, 429 if other else 503)
            self.conversation.moved(other)
            return (Forward(full), *(Forward(d) for d in waiting))
        return (Forward(head.data), *(Forward(d) for d in waiting))

    def connect_failed(self, tried: list[Credential]) -> Commands:
        """The socket could not be opened for another reason (the upstream refused it, or could not be
        reached): the client is closed, to reconnect (and meet the refusal itself, if it lasts)."""
        self.tried.extend(c for c in tried if c not in self.tried)
        self.attempts += len(tried)
        self._waiting = []
        self.cred = None
        return (*self._end_all(502, "upstream_error", None), CloseClient(*UNAVAILABLE))

    def exhausted(self, status: int, tried: list[Credential]) -> Commands:
        """No credential could open a socket (``status``: 429 when one comes back at a known time, else 503)."""
        self.tried.extend(c for c in tried if c not in self.tried)
        self.attempts += len(tried)
        self._waiting = []
        self.cred = None
        if not self._inflight:
            return ()
        return (Exhausted(), *self._end_all(status, "no_credential", None))

    # Rules ---------------------------------------------------------------------------------

    def _sort(self, kind: str, doc: Mapping[str, Any] | None, now: float, consecutive: int) -> tuple[Frame, Verdict]:
        if doc is None:
            return Frame.EVENT, OK
        if kind == wsframes.RATE_LIMITS:
            return Frame.USAGE, OK
        found = wsframes.verdict(doc, now, consecutive)
        if found.kind is Kind.LIMITED:
            return Frame.LIMIT, found
        return (Frame.END if kind in wsframes.TERMINAL else Frame.EVENT), found

    def _note(self, kind: str, doc: Mapping[str, Any]) -> None:
        if kind == wsframes.OUTPUT_ITEM_DONE:
            self.conversation.output_item(doc)
        elif kind == wsframes.COMPLETED:
            self.conversation.completed(doc)
        elif kind in wsframes.TERMINAL:
            self.conversation.ended()

    def _finish(self, kind: str, doc: Mapping[str, Any] | None, found: Verdict, cred: Credential) -> Commands:
        """The response at the head of the queue ended with this frame."""
        if kind == wsframes.COMPLETED:
            return self._end(200, "served", cred)
        if found.kind is Kind.LIMITED:
            return self._end(429, "upstream_status", cred, found.reason)
        if kind == wsframes.ERROR and doc is not None:
            return self._end(wsframes.status_of(doc) or 500, "upstream_status", cred, found.reason)
        return self._end(200, kind.removeprefix("response."), cred)

    def _end(self, status: int, outcome: str, cred: Credential | None, reason: str = "") -> Commands:
        ended = Ended(status, outcome, cred, reason, tuple(self.tried), self.attempts)
        if self._inflight:
            self._inflight.popleft()
        if self._inflight and self.cred is not None:
            self.phase = Phase.AWAITING  # a pipelined request is next, already sent
            self.tried = [self.cred]
            self.attempts = 1
        else:
            self.phase = Phase.IDLE
        return (ended,)

    def _end_all(self, status: int, outcome: str, cred: Credential | None) -> Commands:
        ended: list[Command] = []
        while self._inflight:
            ended.extend(self._end(status, outcome, cred))
        self.phase = Phase.IDLE
        self._held = []
        return tuple(ended)

    def _failover(self, cred: Credential, found: Verdict) -> Commands:
        self._held = []  # the response goes on elsewhere: its output will be recorded from the new socket
        block = Block(cred, found)
        self.cred = None
        if len(self._inflight) != 1:
            return self._reconnect(block, 429)
        full = self.conversation.full_request(self._inflight[0].doc, other_account=True)
        if full is None:  # known before a socket is opened for nothing
            return self._reconnect(block, 429)
        self._moving = full
        return (block, CloseUpstream(*MOVED), Connect(frozenset(c.id for c in self.tried)))

    def _reconnect(self, block: Block | None, status: int) -> Commands:
        """Close the client so that it reconnects with the full input (the request cannot be moved here)."""
        closes: list[Command] = [] if block is None else [block]
        if self.cred is not None or block is not None:
            closes.append(CloseUpstream(*MOVED))
        self.cred = None
        self._waiting = []
        return (*closes, *self._end_all(status, "reconnect", None), CloseClient(*RECONNECT))


def client_close(code: int, reason: str) -> tuple[int, str]:
    """The close to send the client for an upstream close with ``code``: the same, unless it is one
    that cannot be sent (no status, an abnormal or TLS failure: 1011), or out of range."""
    if code == 1005:
        return 1000, reason
    if code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014) or 3000 <= code <= 4999:
        return code, reason
    return 1011, reason or "credproxy: the upstream connection was lost"
