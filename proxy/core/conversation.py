"""The conversation one client socket carried, kept so that another upstream socket can be told all of it.

Theory of operation
-------------------
Over the Responses WebSocket the upstream keeps the conversation on its socket (even with
``store: false``): after the first response Codex sends ``previous_response_id`` and only the new
input items. A socket on another account (or any new upstream socket) has never seen the earlier
items, so a chained request cannot simply be sent there. :class:`Conversation` records what the bridge
saw go by on one client socket:

* each ``response.create`` the client sent: its input items, appended to the items of the response it
  chains on (``previous_response_id``), or starting a new chain when it has none;
* the output items of each response that completed (``response.output_item.done``; the
  ``response.completed`` event's own ``output`` only when no item event came), and the response's id.

:meth:`Conversation.full_request` rebuilds a chained request as a full one: every item before it, then
its own, without ``previous_response_id``. This is what Codex itself sends on a new socket (observed
with Codex 0.171.0: the full input, no ``previous_response_id``, output items of earlier responses
included). When the request moves to another account, encrypted reasoning items go (the ciphertext is
bound to the account that made it; the rule of :mod:`proxy.core.continuation` for HTTP).

A request can be rebuilt only when everything before it is known exactly; :meth:`full_request`
answers ``None`` otherwise, and the bridge closes the client socket instead, so that Codex reconnects
and sends the full input itself. That is the case for a ``previous_response_id`` this socket never
produced (or that was forgotten), for a client frame other than ``response.create`` (its effect on the
conversation is unknown), for a conversation larger than the cap (it is dropped rather than kept), and
for a request moving to another account when the history holds encrypted content other than reasoning
(a ``compaction`` item replaces the history it summarises; dropping it would lose all of that).

Items are kept as their JSON bytes, not as Python objects (a tenth of the memory), and go back into
the rebuilt request as :class:`orjson.Fragment` without being parsed again. Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(frozen=True, slots=True)
class Item:
    """One conversation item as JSON, and whether it carries another account's encrypted content."""

    data: bytes
    reasoning: bool = False  # encrypted reasoning: dropped when the conversation moves to another account
    bound: bool = False  # other encrypted content (compaction): the conversation cannot move without it


def item(value: object) -> Item:
    data = orjson.dumps(value)
    if isinstance(value, dict) and value.get("encrypted_content"):
        if value.get("type") == "reasoning":
            return Item(data, reasoning=True)
        return Item(data, bound=True)
    return Item(data)


def input_items(value: object) -> list[Item] | None:
    """A request's ``input`` as items: a string is one user message (as the API reads it); ``None`` when
    it is neither a string nor a list."""
    if isinstance(value, str):
        return [item({"type": "message", "role": "user", "content": value})]
    if isinstance(value, list):
        return [item(v) for v in value]
    return None


class Conversation:
    """What one client socket said and heard (module docstring). One per client socket."""

    __slots__ = ("_chain", "_ends", "_lost", "_max_bytes", "_on_socket", "_outputs", "_size")

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._chain: list[Item] = []  # the conversation up to the request in flight (its input included)
        self._size = 0
        self._ends: dict[str, int] = {}  # response id -> length of the chain once its output was added
        self._on_socket: set[str] = set()  # response ids the current upstream socket itself knows
        self._outputs: list[Item] | None = None  # output items of the response in flight
        self._lost = False  # the chain is not known exactly: nothing can be rebuilt from it

    @property
    def size(self) -> int:
        """Bytes of JSON held."""
        return self._size

    def on_socket(self, request: Mapping[str, Any]) -> bool:
        """True when the current upstream socket can answer ``request`` as it is (it knows the response
        the request chains on, or the request chains on nothing)."""
        previous = request.get("previous_response_id")
        return previous is None or previous in self._on_socket

    def request(self, request: Mapping[str, Any]) -> None:
        """The client sent ``request`` (a ``response.create``): extend the chain it belongs to."""
        previous = request.get("previous_response_id")
        items = input_items(request.get("input"))
        self._outputs = None
        if previous is None:
            self._restart()
        elif isinstance(previous, str) and previous in self._ends and not self._lost:
            self._cut(self._ends[previous])
        else:
            self._forget()  # chained on something this socket never produced, or forgot
            return
        if items is None:
            self._forget()
            return
        self._extend(items)
        self._outputs = []

    def other_frame(self) -> None:
        """The client sent a frame that is not a ``response.create``: its effect is unknown."""
        self._forget()

    def output_item(self, event: Mapping[str, Any]) -> None:
        """A ``response.output_item.done`` of the response in flight."""
        if self._outputs is not None and "item" in event:
            self._outputs.append(item(event["item"]))

    def completed(self, event: Mapping[str, Any]) -> None:
        """The response in flight completed: its output joins the chain under its id."""
        outputs, self._outputs = self._outputs, None
        response = event.get("response")
        if not isinstance(response, dict) or not isinstance(response.get("id"), str):
            return
        self._on_socket.add(response["id"])  # known upstream whatever this record knows
        if outputs is None:
            return
        if not outputs and isinstance(response.get("output"), list):
            outputs = [item(v) for v in response["output"]]
        self._extend(outputs)
        if not self._lost:
            self._ends[response["id"]] = len(self._chain)

    def ended(self) -> None:
        """The response in flight ended without completing (failed, incomplete, an error): no id to chain on."""
        self._outputs = None

    def full_request(self, request: Mapping[str, Any], other_account: bool) -> bytes | None:
        """``request`` (the last one :meth:`request` saw) as a full request for a new upstream socket, or
        ``None`` when it cannot be rebuilt exactly (module docstring). ``other_account``: the socket is
        on another account than the one that answered so far (encrypted reasoning goes)."""
        if self._lost or (other_account and any(i.bound for i in self._chain)):
            return None
        chain = [i for i in self._chain if not i.reasoning] if other_account else self._chain
        doc = {k: v for k, v in request.items() if k not in ("previous_response_id", "input")}
        doc["input"] = [orjson.Fragment(i.data) for i in chain]
        return orjson.dumps(doc)

    def new_socket(self) -> None:
        """A new upstream socket: it knows none of the responses the earlier one produced."""
        self._on_socket.clear()

    def moved(self, other_account: bool) -> None:
        """The rebuilt request went to the new upstream socket: the responses it replaces are gone, and on
        another account so is the encrypted reasoning."""
        self._ends.clear()
        if other_account and not self._lost:
            self._chain = [i for i in self._chain if not i.reasoning]
            self._size = sum(len(i.data) for i in self._chain)

    def _restart(self) -> None:
        self._chain = []
        self._size = 0
        self._ends.clear()
        self._lost = False

    def _cut(self, length: int) -> None:
        """Go back to the end of an earlier response (a request chained on it, not on the latest)."""
        if length < len(self._chain):
            self._size -= sum(len(i.data) for i in self._chain[length:])
            del self._chain[length:]
            self._ends = {rid: end for rid, end in self._ends.items() if end <= length}

    def _extend(self, items: list[Item]) -> None:
        if self._lost:
            return
        self._chain.extend(items)
        self._size += sum(len(i.data) for i in items)
        if self._size > self._max_bytes:
            self._forget()

    def _forget(self) -> None:
        self._chain = []
        self._size = 0
        self._ends.clear()
        self._lost = True
