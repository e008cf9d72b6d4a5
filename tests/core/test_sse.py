"""Pure table tests: the first SSE event before committing a response, and the marker scanner after."""

from __future__ import annotations

import time
from collections.abc import Sequence

import pytest

from proxy.core import sse
from proxy.core.sse import DEFAULT_MARKERS, EventScanner, event_data, parse_json, split_first_event

FAILED = b'{"type":"response.failed","response":{"error":{"code":"rate_limit_exceeded","message":"try again in 1s"}}}'


@pytest.mark.parametrize(
    ("buffer", "expected"),
    [
        (b"data: a\n\n", b"a"),
        (b"data: a\r\n\r\n", b"a"),
        (b"data:a\n\n", b"a"),
        (b"data:  a\n\n", b" a"),  # only the first space after the colon goes
        (b"data: a\n\ntrailing partial", b"a"),
        (b"event: response.failed\ndata: " + FAILED + b"\n\n", FAILED),
        (b"event: response.failed\r\ndata: " + FAILED + b"\r\n\r\n", FAILED),
        (b"id: 7\nretry: 500\nevent: x\ndata: x\n\n", b"x"),
        # Several data lines are joined with newlines.
        (b"data: a\ndata: b\n\n", b"a\nb"),
        (b"data: a\r\ndata: b\r\ndata: c\r\n\r\n", b"a\nb\nc"),
        (b"data: {\ndata: }\n\n", b"{\n}"),
        # Only the first event counts.
        (b"data: a\n\ndata: b\n\n", b"a"),
        (b"data: a\r\n\r\ndata: b\n\n", b"a"),
        (b"data: a\n\ndata: b\r\n\r\n", b"a"),
        # Comment-only keep-alives and events without data are skipped.
        (b": ping\n\ndata: x\n\n", b"x"),
        (b": ping\r\n\r\ndata: x\r\n\r\n", b"x"),
        (b": ping\n\n: ping\n\nevent: keepalive\n\nretry: 1000\n\ndata: y\n\n", b"y"),
        (b"data:\n\ndata: z\n\n", b"z"),
        (b"\n\ndata: y\n\n", b"y"),
        (b": ping\n\ndata: y", None),
        # A CRLF line ending followed by an LF blank line still ends the event.
        (b"data: a\r\n\n", b"a"),
        # Incomplete.
        (b"", None),
        (b"data: a", None),
        (b"data: a\n", None),
        (b"data: a\r\n", None),
        (b"data: a\r\n\r", None),
        (b": ping\n\n", None),
        (b": ping\n\n: ping\r\n\r\n", None),
        (b"data: a\ndata: b\n", None),
    ],
)
def test_split_first_event(buffer: bytes, expected: bytes | None) -> None:
    assert split_first_event(buffer) == expected


@pytest.mark.parametrize(
    "stream",
    [
        b": ping\n\nevent: response.failed\ndata: " + FAILED + b"\n\ndata: later\n\n",
        b": ping\r\n\r\nevent: response.failed\r\ndata: " + FAILED + b"\r\n\r\ndata: later\r\n\r\n",
    ],
)
def test_the_first_event_appears_only_once_its_separator_has_arrived(stream: bytes) -> None:
    end = stream.index(FAILED) + len(FAILED)
    separator = 4 if stream[end : end + 2] == b"\r\n" else 2
    for cut in range(len(stream) + 1):
        expected = FAILED if cut >= end + separator else None
        assert split_first_event(stream[:cut]) == expected, cut


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (b"data: a", b"a"),
        (b"data:a\ndata:b", b"a\nb"),
        (b"event: x\nid: 1", b""),
        (b": comment", b""),
        (b"data : not a data field", b""),
        (b" data: leading space is another field", b""),
        (b"DATA: case matters", b""),
        (b"data: a\r\ndata: b", b"a\nb"),
        (b"data: a\rdata: b", b"a\nb"),
    ],
)
def test_event_data(event: bytes, expected: bytes) -> None:
    assert event_data(event) == expected


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b'{"type":"error","code":"x"}', {"type": "error", "code": "x"}),
        (b"[1, 2]", [1, 2]),
        (b"null", None),
        (b"[DONE]", None),
        (b"", None),
        (b"{", None),
        (b'{"a": 1e999}', None),
        (b"\xff\xfe", None),
    ],
)
def test_parse_json(data: bytes, expected: object) -> None:
    assert parse_json(data) == expected


RATE_LIMITS = b'{"type":"codex.rate_limits","rate_limits":{"primary":{"used_percent":42.0,"window_minutes":300}}}'
TYPE_ERROR = b'{"type":"error","code":"rate_limit_exceeded","message":"slow down"}'
CHAT_ERROR = b'{"error":{"message":"overloaded","type":"server_error"}}'
COMPLETED = b'{"type":"response.completed","response":{"id":"resp_1","error":null,"usage":{"total_tokens":11}}}'


def stream(events: Sequence[tuple[str | None, bytes]], newline: bytes = b"\n") -> bytes:
    """An SSE stream of ``(event name, data)`` pairs (a ``None`` name writes a comment-only keep-alive)."""
    out = b""
    for name, data in events:
        if name is None:
            out += b": " + data + newline + newline
            continue
        out += b"event: " + name.encode() + newline + b"data: " + data + newline + newline
    return out


EVENTS: list[tuple[str | None, bytes]] = [
    ("response.created", b'{"type":"response.created","response":{"id":"resp_1","error":null}}'),
    (None, b"ping"),
    ("codex.rate_limits", RATE_LIMITS),
    ("response.output_text.delta", b'{"type":"response.output_text.delta","delta":"error-free text"}'),
    ("error", TYPE_ERROR),
    ("response.output_text.delta", b'{"type":"response.output_text.delta","delta":"more"}'),
    ("message", CHAT_ERROR),
    ("response.failed", FAILED),
    ("response.completed", COMPLETED),
]
FOUND = [RATE_LIMITS, TYPE_ERROR, CHAT_ERROR, FAILED]


def feed_all(chunks: list[bytes], scanner: EventScanner | None = None) -> list[bytes]:
    scanner = scanner or EventScanner()
    found: list[bytes] = []
    for chunk in chunks:
        found.extend(scanner.feed(chunk))
    return found


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
def test_scanner_finds_the_marked_events_in_one_chunk(newline: bytes) -> None:
    assert feed_all([stream(EVENTS, newline)]) == FOUND


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
def test_scanner_finds_the_same_events_wherever_the_stream_is_cut(newline: bytes) -> None:
    data = stream(EVENTS, newline)
    for cut in range(len(data) + 1):
        assert feed_all([data[:cut], data[cut:]]) == FOUND, cut


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
def test_scanner_fed_one_byte_at_a_time(newline: bytes) -> None:
    data = stream(EVENTS, newline)
    assert feed_all([data[i : i + 1] for i in range(len(data))]) == FOUND


def test_scanner_with_events_cut_at_two_places() -> None:
    data = stream([("codex.rate_limits", RATE_LIMITS), ("x", b"{}"), ("response.failed", FAILED)], b"\r\n")
    for first in range(0, len(data), 7):
        for second in range(first, len(data) + 1, 5):
            got = feed_all([data[:first], data[first:second], data[second:]])
            assert got == [RATE_LIMITS, FAILED], (first, second)


def test_scanner_returns_each_event_once_as_soon_as_it_is_complete() -> None:
    scanner = EventScanner()
    first = stream([("codex.rate_limits", RATE_LIMITS)])
    assert scanner.feed(first[:-1]) == []
    assert scanner.feed(first[-1:]) == [RATE_LIMITS]
    assert scanner.feed(b"") == []
    assert scanner.feed(b"data: plain\n\n") == []
    assert scanner.feed(b"data: " + FAILED + b"\n\n") == [FAILED]


@pytest.mark.parametrize(
    "events",
    [
        [("response.created", b'{"type":"response.created"}'), ("response.completed", COMPLETED)],
        [("response.output_text.delta", b'{"delta":"the word error, quoted: \\"error\\""}')],
        [(None, b"codex.rate_limits in a comment has no data")],
        [("response.failed", b"")],  # a marker in the event name, no data
    ],
)
def test_scanner_ignores_events_without_a_marker_in_their_data(events: list[tuple[str | None, bytes]]) -> None:
    assert feed_all([stream(events)]) == []


def test_without_a_marker_in_the_chunk_nothing_is_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_run(*args: object) -> object:
        raise AssertionError("parsed a chunk without a marker")

    monkeypatch.setattr(sse, "event_data", must_not_run)
    monkeypatch.setattr(sse, "_boundary", must_not_run)
    quiet = stream(
        [("response.output_text.delta", b'{"delta":"x' + b"y" * 10_000 + b'"}')] * 50 + [("done", COMPLETED)]
    )
    assert feed_all([quiet[i : i + 4096] for i in range(0, len(quiet), 4096)]) == []


DELTA_WITH_MARKERS = b'{"type":"response.output_text.delta","delta":"response.failed {\\"error\\" codex.rate_limits"}'


@pytest.mark.parametrize(
    "name", [b"response.output_text.delta", b"response.function_call_arguments.delta", b"content_block_delta"]
)
def test_a_chunk_that_is_one_delta_event_is_not_searched(monkeypatch: pytest.MonkeyPatch, name: bytes) -> None:
    """Most of a stream is one delta per chunk: it is passed on without a marker search, even when
    the generated text quotes a marker (a delta is never a limit or usage event)."""

    def must_not_run(self: EventScanner, data: bytes) -> bool:
        raise AssertionError("searched a chunk that is one delta event")

    monkeypatch.setattr(EventScanner, "_marked", must_not_run)
    data = DELTA_WITH_MARKERS.replace(b"response.output_text.delta", name)
    assert EventScanner().feed(b"event: " + name + b"\ndata: " + data + b"\n\n") == []


@pytest.mark.parametrize(
    ("chunk", "expected"),
    [
        # A delta, then a marked event in the same chunk: both searched (the delta quotes markers).
        (
            stream([("response.output_text.delta", DELTA_WITH_MARKERS), ("response.failed", FAILED)]),
            [DELTA_WITH_MARKERS, FAILED],
        ),
        # The event line says delta, the data says otherwise: the data decides.
        (stream([("response.output_text.delta", FAILED)]), [FAILED]),
        # The same delta with CRLF lines, or with its data on two lines: searched (and, being a delta
        # that quotes markers, found; the caller parses it and finds no error in it).
        (stream([("response.output_text.delta", DELTA_WITH_MARKERS)], b"\r\n"), [DELTA_WITH_MARKERS]),
        (
            b"event: response.output_text.delta\ndata: "
            + DELTA_WITH_MARKERS[:40]
            + b"\ndata: "
            + DELTA_WITH_MARKERS[40:]
            + b"\n\n",
            [DELTA_WITH_MARKERS[:40] + b"\n" + DELTA_WITH_MARKERS[40:]],
        ),
    ],
)
def test_anything_but_one_whole_delta_event_is_searched(chunk: bytes, expected: list[bytes]) -> None:
    assert EventScanner().feed(chunk) == expected


def test_a_delta_event_cut_in_two_is_searched_once_whole() -> None:
    scanner = EventScanner()
    delta = stream([("response.output_text.delta", DELTA_WITH_MARKERS)])
    assert scanner.feed(delta[:-1]) == []
    assert scanner.feed(delta[-1:]) == [DELTA_WITH_MARKERS]


def test_a_delta_chunk_that_completes_a_pending_event_is_searched_with_it() -> None:
    scanner = EventScanner()
    assert scanner.feed(b'data: {"type":"error"') == []
    delta = stream([("response.output_text.delta", b'{"type":"response.output_text.delta","delta":"x"}')])
    found = scanner.feed(delta)
    assert len(found) == 1
    assert found[0].startswith(b'{"type":"error"event: response.output_text.delta\n')


def test_custom_markers() -> None:
    scanner = EventScanner((b"needle",))
    assert scanner.feed(b"data: hay\n\ndata: a needle\n\ndata: " + FAILED + b"\n\n") == [b"a needle"]
    assert DEFAULT_MARKERS == (b"codex.rate_limits", b"response.failed", b'"type":"error"', b'{"error"')


@pytest.mark.parametrize("chunk_size", [1 << 16, 1000, 3 << 20])
def test_a_two_mib_event_arrives_intact(chunk_size: int) -> None:
    """F25: a 2 MiB event is found whole, whatever the chunking."""
    big = b'{"type":"response.failed","response":{"error":{"code":"x"},"output":"' + b"z" * (2 << 20) + b'"}}'
    data = stream([("response.created", b"{}"), ("response.failed", big), ("codex.rate_limits", RATE_LIMITS)])
    found = feed_all([data[i : i + chunk_size] for i in range(0, len(data), chunk_size)])
    assert len(found) == 2
    assert found[0] == big
    assert found[1] == RATE_LIMITS


def test_an_event_over_four_mib_is_dropped_to_bound_memory() -> None:
    scanner = EventScanner()
    head = b"data: " + FAILED + b" "
    chunks = [head] + [b"x" * (1 << 20)] * 5
    assert feed_all(chunks, scanner) == []
    # The oversized event was dropped, not kept: its end yields nothing, and the stream goes on.
    assert scanner.feed(b"\n\n") == []
    assert scanner.feed(b"data: " + RATE_LIMITS + b"\n\n") == [RATE_LIMITS]


def test_a_large_event_in_small_chunks_costs_linear_time() -> None:
    """The scanner runs on the event loop: a 3 MiB event in 1 KiB chunks must not rescan what is pending.

    Rescanning and recopying the pending bytes for every chunk took about 20 s here; linear work takes
    a few hundredths of a second, so the bound leaves room for a slow machine.
    """
    big = b'{"type":"response.failed","output":"' + b"z" * (3 << 20) + b'"}'
    data = stream([("response.failed", big)])
    chunks = [data[i : i + 1024] for i in range(0, len(data), 1024)]
    started = time.perf_counter()
    found = feed_all(chunks)
    elapsed = time.perf_counter() - started
    assert found == [big]
    assert elapsed < 2.0, f"{elapsed:.2f} s"
