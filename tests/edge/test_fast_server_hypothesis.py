"""parse_head (proxy/edge/fast_server.py) against aiohttp's own request parser, on generated heads.

The fast server answers a request itself only when :func:`parse_head` returns a head; everything else
goes to aiohttp's server, whose parser answers. So whenever parse_head takes a head, aiohttp's parser
must take the same bytes and read the same request from them: method, target, HTTP/1.1, the headers in
order with their values stripped alike, the body's length (the next request starts at the same byte),
keep-alive or close, no upgrade, no chunked body. A head the two read differently is a request
smuggling or desync bug. When parse_head declines a head, aiohttp decides: nothing to compare.

The heads are regular ones with mutations (odd methods, targets, versions, header names and values,
repeated and special headers, Content-Length and Connection forms, bare CR or LF, NUL and other
control bytes, obs-fold, long names): up to three of any kind, or one after which parse_head may
still take the head (so that each is compared alone, not hidden behind one it declines), or none.
Each head is checked with the default limits or with small ones (to reach the limit edges), against
aiohttp's C parser (what its server uses) and its pure-Python one (what it uses without its
extensions, as with ``AIOHTTP_NO_EXTENSIONS``). ``derandomize``: every run draws the same examples,
1,600 in all.
"""

from __future__ import annotations

import asyncio
import functools
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import pytest
from aiohttp import http_parser
from aiohttp.base_protocol import BaseProtocol
from aiohttp.helpers import DEFAULT_CHUNK_SIZE
from aiohttp.http import HttpVersion11
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import RawRequestMessage
from aiohttp.web_protocol import MAX_MSG_QUEUE_SIZE, RequestPayloadError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.config import Limits
from proxy.edge.fast_server import Head, parse_head
from proxy.edge.server import handler_settings

LIMITS = Limits()
#: Small limits, so that generated heads reach the line, field and count limits.
SMALL = replace(LIMITS, max_request_line_bytes=50, max_header_bytes=40, max_headers=8)

Parser = Callable[..., Any]
#: The C parser is aiohttp's server's parser unless its extensions are missing or turned off.
PARSERS: dict[str, Parser] = {"python": http_parser.HttpRequestParserPy}
if hasattr(http_parser, "HttpRequestParserC"):
    PARSERS["c"] = http_parser.HttpRequestParserC

#: Body bytes sent after a head; a longer Content-Length gets this many and must not be complete.
BODY_CAP = 64
#: A request after the first one: aiohttp must find it where the fast server would.
NEXT = b"GET /next HTTP/1.1\r\nHost: next\r\n\r\n"


# -- what aiohttp reads --------------------------------------------------------------------------


@contextmanager
def event_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A loop for the parsers' payload streams (which only make futures when read from)."""
    loop = asyncio.new_event_loop()
    try:
        yield loop
    finally:
        loop.close()


def aiohttp_parser(parser_class: Parser, limits: Limits, loop: asyncio.AbstractEventLoop) -> Any:
    """A request parser made as aiohttp's ``web_protocol.RequestHandler`` makes it, with the proxy's
    handler settings (:func:`proxy.edge.server.handler_settings`) and ``auto_decompress=False``."""
    settings_ = handler_settings(limits)
    return parser_class(
        BaseProtocol(loop),
        loop,
        DEFAULT_CHUNK_SIZE,
        max_line_size=settings_["max_line_size"],
        max_field_size=settings_["max_field_size"],
        max_headers=settings_["max_headers"],
        payload_exception=RequestPayloadError,
        auto_decompress=False,
        max_msg_queue_size=MAX_MSG_QUEUE_SIZE,
    )


def decoded(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")  # as aiohttp decodes header names and values


def fast_server_reads(stream: bytes, limits: Limits) -> tuple[Head | None, int]:
    """What :meth:`FastConnection._next_request` does with ``stream``: the head it parses, or None,
    and where that head's blank line ends."""
    end = stream.find(b"\r\n\r\n")
    if end == -1:
        return None, -1  # it waits for more, or hands over a head with a bare LF
    return parse_head(stream[: end + 2], limits), end + 4


def assert_same_request(head: Head, message: RawRequestMessage, where: str) -> None:
    read = (message.method, message.path, message.version, message.should_close, message.upgrade, message.chunked)
    assert read == (head.method, head.target, HttpVersion11, head.close, False, False), where
    assert [(decoded(name), decoded(value)) for name, value in message.raw_headers] == head.items, where
    for name, value in head.first.items():
        assert message.headers.get(name) == value, where  # the first value, as on aiohttp's path
    assert int(message.headers.get("Content-Length", "0")) == head.content_length, where
    path = head.target.partition("?")[0]
    assert (message.url.raw_path, message.url.path) == (path, path), where


def check(stream: bytes, limits: Limits, loop: asyncio.AbstractEventLoop) -> bool:
    """Whether the fast server takes the request at the start of ``stream`` (a head and its blank
    line); when it does, assert that aiohttp's parsers read the same request from the same bytes."""
    head, start = fast_server_reads(stream, limits)
    if head is None:
        return False
    rest = stream[start:]  # more after a blank line inside the generated head: the body's start
    length = head.content_length
    sent = rest + b"b" * max(0, min(length, BODY_CAP) - len(rest))
    body = sent[:length]
    complete = len(body) == length
    for name, parser_class in PARSERS.items():
        where = f"{name} parser on {stream!r}"
        parser = aiohttp_parser(parser_class, limits, loop)
        try:
            messages, upgraded, tail = parser.feed_data(stream[:start] + body)
        except HttpProcessingError as exc:
            pytest.fail(f"parse_head took a head aiohttp refuses ({exc!r}): {where}")
        assert (len(messages), upgraded, tail) == (1, False, b""), where
        message, payload = messages[0]
        assert_same_request(head, message, where)
        assert (payload.read_nowait(-1), payload.is_eof()) == (body, complete), where
        if complete and not head.close and sent == body:
            # The next request starts where the fast server would look for it.
            parser.message_consumed()
            messages, upgraded, tail = parser.feed_data(NEXT)
            assert [m.path for m, _ in messages] == ["/next"], where
    return True


# -- the heads -----------------------------------------------------------------------------------
# Strategies are made once: hypothesis validates every new strategy object, which costs more than
# drawing from it.


def pick(*options: bytes) -> st.SearchStrategy[bytes]:
    return st.sampled_from(options)


@functools.cache
def below(n: int) -> st.SearchStrategy[int]:
    return st.integers(0, n - 1)


def text(alphabet: bytes, min_size: int, max_size: int) -> st.SearchStrategy[bytes]:
    """Strings of ``alphabet``, drawn as one choice (a string strategy draws per character)."""
    table = bytes(alphabet[byte % len(alphabet)] for byte in range(256))
    return st.binary(min_size=min_size, max_size=max_size).map(lambda raw: raw.translate(table))


def insert(draw: st.DrawFn, text: bytes, piece: st.SearchStrategy[bytes]) -> bytes:
    at = draw(below(len(text) + 1))
    return text[:at] + draw(piece) + text[at:]


METHODS = pick(b"GET", b"POST", b"PUT", b"PATCH", b"DELETE", b"HEAD", b"OPTIONS")
ODD_METHODS = pick(
    b"get", b"Post", b"CONNECT", b"TRACE", b"PRI", b"QUERY", b"PROPFIND", b"M-SEARCH", b"SOURCE", b"PURGE",
    b"SEARCH", b"LINK", b"DESCRIBE", b"SETUP", b"FOO", b"GETX", b"A" * 21, b"GE T", b"GET\x00", b"G\x80T", b"",
)  # fmt: skip
TARGETS = pick(
    b"/openai/responses", b"/openai/v1/chat/completions?stream=true", b"/openai/models", b"/", b"/x?a=b&c=d",
    b"/openai/responses?",
)  # fmt: skip
ODD_TARGETS = pick(
    b"*", b"http://h/openai/models", b"https://h:8/x", b"http:h/x", b"//h/x", b"h:443", b"openai/models",
    b"/_credproxy/health", b"/_credproxy", b"/_credproxy/../openai/models", b"/openai/../_credproxy/status",
    b"", b"/" + b"a" * 48,
)  # fmt: skip
TARGET_PIECES = pick(
    b"%2e", b"%", b"#frag", b" ", b"*", b"?", b"??", b"\x80", b"\xc3\xa9", b"\xff", b"\x00", b"\x7f", b"\t",
    b'"', b"<>", b"\\", b"{|}", b"^`", b"//", b"/../", b"/./", b";p=1", b"~", b"@", b":", b"[]", b"\r", b"\n",
)  # fmt: skip
ODD_VERSIONS = pick(
    b"HTTP/1.0", b"HTTP/2", b"HTTP/2.0", b"HTTP/1.2", b"HTTP/0.9", b"http/1.1", b"HTTP/1.1 ", b"HTTP/1.10",
    b"HTTP/11", b"HTTP/1.1\x00", b"", b"HTTP/1", b"HTTP/9.9", b"HTTPS/1.1", b"RTSP/1.0", b"HTTP/1.1/",
)  # fmt: skip
ODD_SPACES = pick(b"  ", b"\t", b"")
HOSTS = pick(b"127.0.0.1:8787", b"h")
NAME_LIST = (
    b"Host", b"Content-Type", b"Content-Length", b"Connection", b"Authorization", b"User-Agent", b"Accept",
    b"X-Session-Id", b"Origin", b"X-Credproxy-Token", b"Accept-Encoding", b"ETag", b"Max-Forwards", b"Server",
    b"Content-Range", b"Content-Location", b"Trailer", b"Sec-WebSocket-Key",
)  # fmt: skip
#: Names aiohttp's parsers or the fast server treat specially.
SPECIAL_NAME_LIST = (
    b"Transfer-Encoding", b"Expect", b"Upgrade", b"Proxy-Connection", b"Keep-Alive", b"TE",
    b"Sec-WebSocket-Key1", b"Content-Encoding",
)  # fmt: skip
NAMES = pick(*NAME_LIST[1:])  # Host comes first; a repeated one is a mutation
REGULAR_NAME_LISTS = st.lists(NAMES, unique=True, max_size=5)
SPECIAL_NAMES = pick(*SPECIAL_NAME_LIST)
CASED_NAMES = st.tuples(pick(*NAME_LIST, *SPECIAL_NAME_LIST), st.booleans()).map(
    lambda pair: pair[0].lower() if pair[1] else pair[0].upper()
)
TOKEN = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
TOKEN_NAMES = text(TOKEN, 1, 12)
#: Names about as long as the small limits' max_header_bytes (aiohttp's C parser counts two together).
LONG_NAMES = text(TOKEN, 12, 36)
ODD_NAMES = pick(
    b"", b" Host", b"Host ", b"X Bad", b"X-Bad\t", b"X\x00", b"X\x80", b"X(y)", b"X/y", b"X@y", b'X"', b"X{",
    b"\xc3\xa9", b"X:Y", b"\tX", b"X\x7f", b"X\r", b"X\n", b"[X]",
)  # fmt: skip
SEPARATORS = pick(b": ", b":", b":  ", b":\t", b": \t")
ODD_SEPARATORS = pick(b" :", b"\t:", b"::", b" : ")
VALUES = text(bytes(range(0x20, 0x7F)) + b"\t", 0, 16)
SHORT_VALUES = text(bytes(range(0x21, 0x7F)), 0, 2)
ODD_BYTES = pick(b"\x00", b"\x01", b"\x7f", b"\x80", b"\xc3\xa9", b"\xff", b"\r", b"\n", b"\x0b", b"\x0c", b"\x1b")
SPACE = (b"", b" ", b"\t", b"  ", b" \t ")
#: Optional whitespace before and after a value.
AROUND = st.sampled_from([(before, after) for before in SPACE for after in SPACE])
LENGTHS = pick(b"0", b"5", b"12", b"64", b"1")
ODD_LENGTHS = pick(
    b"+5", b"-1", b"5 ", b" 5", b"0x5", b"05", b"5,5", b"5, 5", b"5 5", b"", b"1" * 18, b"1" * 19, b"9" * 18,
    b"9" * 20, b"0" * 20 + b"5", b"1e3", b"5.0", "\u0663".encode(), b"5\x00", b"\t5",
)  # fmt: skip
CONNECTION_LIST = (b"close", b"keep-alive", b"Close", b"CLOSE", b"keep-alive, close")
CONNECTIONS = pick(*CONNECTION_LIST)
CONNECTION_NAMES = pick(b"Connection", b"connection", b"Proxy-Connection")
ODD_CONNECTIONS = pick(
    *CONNECTION_LIST, b"close, upgrade", b"upgrade", b"Upgrade, HTTP2-Settings", b"close,", b"  close  ",
    b",close", b"close;q", b"closed", b"x close", b"te, close", b"keep-alive , Close", b"", b"cl ose",
    b"close\t,\tkeep-alive", b"keep-alive,,close", b"close\x0b", b"clos\xc3\xa9",
)  # fmt: skip
SPECIAL_VALUES = {
    b"transfer-encoding": pick(b"chunked", b"gzip, chunked", b"identity", b"chunked "),
    b"expect": pick(b"100-continue", b"100-Continue"),
    b"upgrade": pick(b"websocket", b"h2c", b"tcp"),
    b"host": pick(b"127.0.0.1:8787", b"h", b"", b"a b", b"[::1]:8787"),
    b"proxy-connection": pick(b"close", b"keep-alive"),
}
#: Obsolete line folding: a line starting with SP or HTAB continues the one before.
FOLDS = pick(b" folded", b"\tfolded", b" ", b"\t")
LINE_ENDS = pick(b"\n", b"\r", b"\n\r", b"\r\r\n", b"\r\n\r\n")
CONTROL_BYTES = pick(b"\x00", b"\x01", b"\x7f")
#: Mutations after which parse_head may still take a head, and those after which it must not (drawn
#: less often: a head parse_head declines is not compared).
MAY_TAKE = (
    "method", "target piece", "special header", "token name", "cased name", "content-length", "connection",
    "repeat", "reorder", "long names",
)  # fmt: skip
MUST_NOT_TAKE = (
    "target", "version", "spacing", "no host", "odd name", "separator", "odd bytes", "fold", "line end",
    "control byte",
)  # fmt: skip
ADD_A_HEADER = frozenset(
    ("special header", "token name", "cased name", "content-length", "connection", "odd name", "separator")
)
#: Up to three mutations of any kind: none for about a quarter of the heads, mostly one or two.
MUTATIONS = st.tuples(
    st.sampled_from((0, 0, 1, 1, 1, 2, 2, 3)),
    st.lists(st.sampled_from(MAY_TAKE * 3 + MUST_NOT_TAKE), min_size=3, max_size=3),
).map(lambda drawn: drawn[1][: drawn[0]])
#: One mutation parse_head may take: each is checked alone, not hidden behind one it declines.
ONE_MUTATION = st.sampled_from(MAY_TAKE).map(lambda mutation: [mutation])
NO_MUTATION: st.SearchStrategy[list[str]] = st.just([])


def regular_header(draw: st.DrawFn, name: bytes) -> bytes:
    if name.lower() == b"content-length":
        value = draw(LENGTHS)
    elif name.lower() == b"connection":
        value = draw(CONNECTIONS)
    else:
        value = draw(VALUES)
    before, after = draw(AROUND)
    return name + draw(SEPARATORS) + before + value + after


def odd_header(draw: st.DrawFn, mutation: str) -> bytes:
    """A header line for one of the mutations that add one."""
    if mutation == "special header":
        name = draw(SPECIAL_NAMES)
    elif mutation == "odd name":
        name = draw(ODD_NAMES)
    elif mutation == "token name":
        name = draw(TOKEN_NAMES)
    elif mutation == "cased name":
        name = draw(CASED_NAMES)
    elif mutation == "content-length":
        return b"Content-Length: " + draw(ODD_LENGTHS)
    elif mutation == "connection":  # another one, or the first
        return draw(CONNECTION_NAMES) + b": " + draw(ODD_CONNECTIONS)
    else:  # "separator"
        return draw(NAMES) + draw(ODD_SEPARATORS) + draw(VALUES)
    special = SPECIAL_VALUES.get(name.lower())
    if special is not None and draw(st.booleans()):
        return name + b": " + draw(special)
    return regular_header(draw, name)


@st.composite
def request_heads(draw: st.DrawFn, mutations: st.SearchStrategy[list[str]]) -> bytes:
    """A request head, lines ending with CRLF, without the blank line: a regular one, mutated."""
    method, target, version = draw(METHODS), draw(TARGETS), b"HTTP/1.1"
    spaces = [b" ", b" "]
    headers = [b"Host: " + draw(HOSTS)] + [regular_header(draw, name) for name in draw(REGULAR_NAME_LISTS)]
    line_end: tuple[int, bytes] | None = None
    control = False
    for mutation in draw(mutations):
        at = draw(below(len(headers) + 1))  # where in the header lines
        match mutation:
            case "method":
                method = draw(ODD_METHODS)
            case "target":
                target = draw(ODD_TARGETS)
            case "target piece":
                target = insert(draw, target, TARGET_PIECES)
            case "version":
                version = draw(ODD_VERSIONS)
            case "spacing":
                spaces[draw(below(2))] = draw(ODD_SPACES)
            case "no host":
                headers = [line for line in headers if not line.startswith(b"Host: ")]
            case "odd bytes" if headers:
                at %= len(headers)
                headers[at] = insert(draw, headers[at], ODD_BYTES)
            case "fold" if headers:
                headers.insert(1 + at % len(headers), draw(FOLDS))
            case "repeat" if headers:
                headers.insert(at, headers[draw(below(len(headers)))])
            case "reorder":
                headers = headers[at:] + headers[:at]
            case "line end":
                line_end = (at, draw(LINE_ENDS))  # 0: the request line
            case "control byte":
                control = True
            case "long names":  # two in a row, with short values
                headers[at:at] = [draw(LONG_NAMES) + b":" + draw(SHORT_VALUES) for _ in range(2)]
            case _ if mutation in ADD_A_HEADER:
                headers.insert(at, odd_header(draw, mutation))
    lines = [method + spaces[0] + target + spaces[1] + version, *headers]
    ends = [b"\r\n"] * len(lines)
    if line_end is not None:
        ends[line_end[0] % len(lines)] = line_end[1]
    head = b"".join(line + end for line, end in zip(lines, ends, strict=True))
    return insert(draw, head, CONTROL_BYTES) if control else head


# -- the properties ------------------------------------------------------------------------------


def taken_heads(mutations: st.SearchStrategy[list[str]], examples: int) -> Counter[tuple[bool, bool]]:
    """Check ``examples`` generated heads, each with the default or the small limits; how many the fast
    server took and declined, by (small limits, taken)."""
    taken: Counter[tuple[bool, bool]] = Counter()
    with event_loop() as loop:

        @settings(
            max_examples=examples,
            derandomize=True,  # the same examples on every run
            database=None,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],  # time is no criterion for a deterministic test
        )
        @given(request_heads(mutations), st.sampled_from((LIMITS, SMALL)))
        def agree(head: bytes, limits: Limits) -> None:
            taken[limits is SMALL, check(head + b"\r\n", limits, loop)] += 1

        agree()
    return taken


def test_aiohttp_reads_every_head_the_fast_server_takes_as_it_does() -> None:
    taken = taken_heads(MUTATIONS, 900)
    # The property means something only if parse_head takes many of the heads, and declines many,
    # with either limits.
    for small in (False, True):
        total = taken[small, True] + taken[small, False]
        assert 0.2 * total <= taken[small, True] <= 0.8 * total, taken


def test_with_one_mutation_the_fast_server_may_take() -> None:
    taken = taken_heads(ONE_MUTATION, 500)
    assert taken[False, True] >= 0.5 * (taken[False, True] + taken[False, False]), taken


def test_the_fast_server_takes_every_regular_head_with_the_default_limits() -> None:
    taken = taken_heads(NO_MUTATION, 200)
    assert taken[False, True] > 50, taken
    assert taken[False, False] == 0, taken
