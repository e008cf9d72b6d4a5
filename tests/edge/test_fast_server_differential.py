"""parse_head against aiohttp's own request parser, on thousands of generated heads.

The fast server answers a request itself only when :func:`proxy.edge.fast_server.parse_head` takes its head;
every other head goes to aiohttp's server, whose parser (llhttp, in C) then decides. The safety
property: whatever parse_head takes, aiohttp's parser takes too and reads the same request from it
(method, target, version, headers, body length, keep-alive). A head that parse_head reads one way and
aiohttp another would be a request-smuggling gap between the two servers of one port.

The heads are made from regular ones by seeded random mutations (the same ones at every run), so
that both sides see near-misses: odd bytes in names and values, whitespace, repeated and framing
headers, odd targets and versions.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import HttpRequestParserC, HttpRequestParserPy

from proxy.config import Limits
from proxy.edge.fast_server import Head, parse_head

LIMITS = Limits()
EXAMPLES = 4000

METHODS = [b"POST", b"GET", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"post", b"P0ST", b"GE T", b"X" * 21]
TARGETS = [
    b"/openai/responses",
    b"/codex/responses?stream=true&x=%2F",
    b"/openai/models#frag",
    b"/openai/a%20b",
    b"/_credproxy/health",
    b"http://h/openai/responses",
    b"*",
    b"//h/x",
    b"/a/../b",
    b"/caf\xc3\xa9",
    b"/a\tb",
    b"/a b",
    b"/",
    b'/q?"x"&y=|~',
]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"HTTP/1.1 ", b"http/1.1", b"HTTP/1.10", b"HTTP/1.1\x00"]
NAMES = [
    b"Host",
    b"Content-Type",
    b"Content-Length",
    b"Connection",
    b"Authorization",
    b"X-Session-Id",
    b"session_id",
    b"Accept",
    b"Transfer-Encoding",
    b"Expect",
    b"Upgrade",
    b"Origin",
    b"X-Codex-Turn-Metadata",
    b"Keep-Alive",
    b"TE",
    b"Content-Encoding",
]
VALUES = [
    b"127.0.0.1:8787",
    b"application/json",
    b"close",
    b"keep-alive",
    b"Close",
    b"close, upgrade",
    b"keep-alive, close",
    b"Bearer sk-test-0001",
    b"chunked",
    b"gzip, chunked",
    b"100-continue",
    b"websocket",
    b'{"a":1,"b":"c d"}',
    b"",
    b"a,b",
    b"x" * 40,
]
LENGTHS = [b"0", b"5", b"05", b"+5", b"-1", b"5 ", b" 5", b"5,5", b"0x5", b"5.0", b"9" * 19, b"\xd9\xa5", b"", b"1e2"]
BODY = b'{"a":"b"}'  # what follows a head that asks for a body (cut to its length)
JUNK = [b" ", b"\t", b"\x00", b"\x01", b"\x7f", b"\x80", b"\xff", b"\r", b"\n", b":", b"@", b"(", b'"', b";", b"\x0b"]


def regular(rng: random.Random) -> list[bytes]:
    """The lines (without CRLF) of a head parse_head should take: a request line and header lines."""
    lines = [b"%s %s HTTP/1.1" % (rng.choice([b"POST", b"GET"]), rng.choice([b"/openai/responses", b"/codex/x?y=1"]))]
    headers = [(b"Host", b"127.0.0.1:8787"), (b"Content-Length", rng.choice([b"0", b"5", b"9"]))]
    for _ in range(rng.randrange(6)):
        headers.append((rng.choice(NAMES[4:8] + NAMES[12:13]), rng.choice(VALUES[:8] + VALUES[12:])))
    if rng.random() < 0.3:
        headers.append((b"Connection", rng.choice([b"close", b"keep-alive", b"Close", b"x, close"])))
    rng.shuffle(headers)
    lines += [name + b":" + rng.choice([b" ", b"", b"  ", b"\t"]) + value for name, value in headers]
    return lines


def mutate(rng: random.Random, lines: list[bytes]) -> list[bytes]:
    """One to three changes of the kinds that separate a regular head from an irregular one."""
    lines = list(lines)
    for _ in range(rng.randrange(1, 4)):
        kind = rng.randrange(12)
        at = rng.randrange(1, len(lines)) if len(lines) > 1 else 0
        if kind == 0:
            lines[0] = b" ".join([rng.choice(METHODS), rng.choice(TARGETS), rng.choice(VERSIONS)])
        elif kind == 1:  # a junk byte somewhere in a header line
            line = lines[at]
            spot = rng.randrange(len(line) + 1)
            lines[at] = line[:spot] + rng.choice(JUNK) + line[spot:]
        elif kind == 2:  # a repeated header
            lines.insert(rng.randrange(1, len(lines) + 1), lines[at])
        elif kind == 3:  # an odd length, in place of the head's own (a second one is a repeated singleton)
            length = b"Content-Length: " + rng.choice(LENGTHS)
            spots = [i for i, line in enumerate(lines) if line.lower().startswith(b"content-length:")]
            if spots:
                lines[spots[0]] = length
            else:
                lines.append(length)
        elif kind == 4:
            lines.append(rng.choice(NAMES) + b": " + rng.choice(VALUES))
        elif kind == 5:  # obsolete line folding
            lines.insert(rng.randrange(1, len(lines) + 1), rng.choice([b" folded", b"\tfolded"]))
        elif kind == 6:  # whitespace around the colon or the value
            name, _, value = lines[at].partition(b":")
            lines[at] = name + rng.choice([b" :", b": ", b" : ", b":\t"]) + value + rng.choice([b"", b" ", b"\t"])
        elif kind == 7 and len(lines) > 1:  # a header goes
            del lines[at]
        elif kind == 8:
            lines.append(b"Connection: " + rng.choice(VALUES[2:8]))
        elif kind == 9:  # a line without a colon, or with an empty name
            lines.insert(rng.randrange(1, len(lines) + 1), rng.choice([b"NoColon", b": v", b"", b"::"]))
        elif kind == 10:
            lines[0] = lines[0].replace(b" ", rng.choice([b"  ", b"\t"]), 1)
        else:
            lines.append(b"X-" + bytes([rng.randrange(32, 127)]) + b": v")
    return lines


def heads() -> Iterator[bytes]:
    rng = random.Random(20261128)
    for n in range(EXAMPLES):
        lines = regular(rng)
        if n % 4:  # a quarter stay regular
            lines = mutate(rng, lines)
        yield b"".join(line + b"\r\n" for line in lines)


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def aiohttp_reads(parser_class: Any, loop: asyncio.AbstractEventLoop, head: bytes, body: bytes) -> Any:
    """What aiohttp's server parser makes of ``head`` (and the blank line, and ``body``): the message,
    or the exception it raises."""
    parser = parser_class(
        BaseProtocol(loop),
        loop,
        2**16,
        max_line_size=LIMITS.max_request_line_bytes,
        max_field_size=LIMITS.max_header_bytes,
        max_headers=LIMITS.max_headers,
    )
    try:
        messages, _, _ = parser.feed_data(head + b"\r\n" + body)
    except HttpProcessingError as exc:
        return exc
    return messages


def assert_same_request(head: Head, messages: Any, raw: bytes, body: bytes) -> None:
    assert isinstance(messages, list), f"parse_head took a head aiohttp refuses ({messages!r}): {raw!r}"
    assert len(messages) == 1, raw
    message, payload = messages[0]
    assert message.method == head.method, raw
    assert message.path == head.target, raw
    assert tuple(message.version) == (1, 1), raw
    aiohttp_items = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in message.raw_headers]
    assert [(name, value.strip(" \t")) for name, value in aiohttp_items] == head.items, raw
    length = message.headers.get("Content-Length")
    assert (int(length) if length is not None else 0) == head.content_length, raw
    assert message.should_close == head.close, raw
    assert not message.upgrade, raw
    assert not message.chunked, raw
    assert payload.read_nowait(-1) == body, raw  # the body ends where parse_head says it does


@pytest.mark.parametrize("parser_class", [HttpRequestParserC, HttpRequestParserPy], ids=["llhttp", "python"])
def test_what_parse_head_takes_aiohttp_reads_the_same_way(parser_class: Any, loop: asyncio.AbstractEventLoop) -> None:
    taken = 0
    for raw in heads():
        head = parse_head(raw, LIMITS)
        if head is None:
            continue  # aiohttp's to answer, whatever it makes of it
        taken += 1
        body = BODY[: head.content_length]
        assert_same_request(head, aiohttp_reads(parser_class, loop, raw, body), raw, body)
    # The property means something only if many heads were taken: every regular one and many mutated ones.
    assert taken > EXAMPLES // 4 + EXAMPLES // 10


def test_the_generator_makes_heads_of_both_kinds() -> None:
    verdicts = [parse_head(raw, LIMITS) is not None for raw in heads()]
    assert 0.2 < sum(verdicts) / len(verdicts) < 0.8
