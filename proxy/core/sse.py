"""Just enough Server-Sent Events parsing to watch a stream without slowing it down.

The proxy never rewrites a stream. It needs two things from it:

* the *first* event, before the response is committed to the client, because a 200 stream whose
  first event is ``response.failed`` with a limit code is really a 429 (:func:`split_first_event`);
* later events that matter for the credential's state (``codex.rate_limits`` usage snapshots, a
  late ``response.failed``): :class:`EventScanner` looks for marker bytes in each chunk with a C-speed
  substring search and parses only the rare events that contain one. A chunk that is exactly one
  text or argument delta (most of a stream: :data:`QUIET_EVENTS`) is not searched at all.

The searches use ``bytes.find``, never ``marker in chunk``: for bytes, ``in`` first tries the
marker as an integer (``65 in b"A"``), and CPython builds and discards a ``TypeError`` message
for every call: about 1,500 instructions, two thirds of what the search of a 200-byte event costs
(callgrind, CPython 3.11).

Events are separated by a blank line (``\\n\\n`` or ``\\r\\n\\r\\n``).
"""

from __future__ import annotations

import orjson

#: Events worth parsing after the response has been committed.
#: ``"type":"error"`` is a Responses error event; ``{"error"`` a Chat Completions stream error. A bare
#: ``"error"`` would match every ``response.completed`` (``"error": null``) and parse megabytes for nothing.
DEFAULT_MARKERS = (b"codex.rate_limits", b"response.failed", b'"type":"error"', b'{"error"')

#: The start of a chunk that is one event of a type that never carries a limit or usage signal: the
#: deltas that make up most of a stream, named on the ``event:`` line and, as the first key of the
#: data, by ``type``. Such a chunk, when it is one whole event (three line feeds: after the event
#: line, after the data line, and the blank line that ends the event), is not searched.
QUIET_EVENTS = tuple(
    b'event: %s\ndata: {"type":"%s",' % (name, name)
    for name in (
        b"response.output_text.delta",
        b"response.reasoning_summary_text.delta",
        b"response.reasoning_text.delta",
        b"response.function_call_arguments.delta",
        b"response.custom_tool_call_input.delta",
        b"content_block_delta",  # Anthropic's Messages API: text, thinking and tool-input deltas
    )
)

_MAX_PENDING = 4 * 1024 * 1024


def _boundary(data: bytes, start: int = 0) -> tuple[int, int]:
    """Position and length of the first event separator at or after ``start``, or ``(-1, 0)``."""
    lf = data.find(b"\n\n", start)
    crlf = data.find(b"\r\n\r\n", start)
    if crlf != -1 and (lf == -1 or crlf < lf):
        return crlf, 4
    if lf != -1:
        return lf, 2
    return -1, 0


def event_data(event: bytes) -> bytes:
    """The payload of one event: its ``data:`` lines joined by newlines."""
    parts = []
    for line in event.splitlines():
        if line.startswith(b"data:"):
            value = line[5:]
            parts.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(parts)


def split_first_event(buffer: bytes) -> bytes | None:
    """The data of the first event that carries data, or ``None`` while it is incomplete.

    Comment-only events (keep-alives such as ``: ping``) are skipped.
    """
    start = 0
    while True:
        pos, size = _boundary(buffer, start)
        if pos == -1:
            return None
        data = event_data(buffer[start:pos])
        if data:
            return data
        start = pos + size


def parse_json(data: bytes | str) -> object:
    """Parsed JSON, or ``None`` for anything that is not (the proxy is not a validator)."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


class EventScanner:
    """Finds complete events containing one of ``markers`` in a stream fed chunk by chunk."""

    __slots__ = ("_markers", "_pending")

    def __init__(self, markers: tuple[bytes, ...] = DEFAULT_MARKERS) -> None:
        self._markers = markers
        self._pending = bytearray()

    def feed(self, chunk: bytes) -> list[bytes]:
        """Return the data of every event completed by ``chunk`` that contains a marker."""
        pending = self._pending
        if not pending and chunk.startswith(QUIET_EVENTS) and chunk.endswith(b"\n\n") and chunk.count(b"\n") == 3:
            return []  # one whole delta event: its event line, its data line, the blank line
        if pending:
            # The pending bytes hold no separator: only the new bytes (and the three before them, for
            # a separator cut in two) can end an event. Searching the whole pending event again for
            # every chunk would make a large event cost time quadratic in its size.
            search_from = max(len(pending) - 3, 0)
            pending += chunk
            data: bytes | bytearray = pending
        else:
            # The common case (a chunk that ends at an event boundary) copies nothing.
            search_from = 0
            data = chunk
        last_lf = data.rfind(b"\n\n", search_from)
        last_crlf = data.rfind(b"\r\n\r\n", search_from)
        if last_lf == -1 and last_crlf == -1:
            if len(data) > _MAX_PENDING:
                pending.clear()
            elif data is chunk:
                pending += chunk
            return []
        end = max(last_lf + 2 if last_lf != -1 else 0, last_crlf + 4 if last_crlf != -1 else 0)
        if data is chunk:
            complete = chunk if end == len(chunk) else chunk[:end]
            if end < len(chunk):
                pending += chunk[end:]
        else:
            complete = bytes(pending[:end])
            del pending[:end]
        if len(pending) > _MAX_PENDING:
            pending.clear()
        if not self._marked(complete):
            return []
        found = []
        start = 0
        while True:
            pos, size = _boundary(complete, start)
            if pos == -1:
                break
            event = complete[start:pos]
            if self._marked(event):
                payload = event_data(event)
                if payload:
                    found.append(payload)
            start = pos + size
        return found

    def _marked(self, data: bytes) -> bool:
        for marker in self._markers:  # noqa: SIM110 (a loop: any() with a generator costs more here)
            if data.find(marker) != -1:  # not ``in``: see the module docstring
                return True
        return False
