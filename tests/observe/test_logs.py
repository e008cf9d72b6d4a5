"""The log line writer: the access line's direct path, its redaction, and batched writes.

The access line is built either directly (when the handler of ``logs.configure`` alone would see
it) or through ``logging`` (when anything else could: a second handler, as pytest's caplog adds, or a
logger filter). Both must give the same line and the same redaction; batching must never lose or
reorder a line.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import orjson
import pytest
from yarl import URL

from proxy.config import Logging, Provider
from proxy.core.clock import ManualClock
from proxy.core.credentials import parse_credentials
from proxy.core.pool import Pool
from proxy.core.secret import _PATTERNS, Secret, redact, redact_each
from proxy.observe import logs
from proxy.observe.record import RequestRecord
from proxy.testing.fake_upstream import FakeUpstream, rate_limit
from tests.conftest import ProxyFactory

POOL_SECRET = "poolSECRETnoShape0123"  # no known shape: only the pool's knowledge can mask it
CLIENT_TOKEN = "cpx_client-token-0123456789"
SECRETS = (POOL_SECRET, CLIENT_TOKEN)
STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")


class Writes(io.StringIO):
    """A stream that counts write calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def write(self, text: str) -> int:
        self.calls += 1
        return super().write(text)


@pytest.fixture
def stream() -> Iterator[Writes]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    access_level = logging.getLogger("aiohttp.access").level
    out = Writes()
    yield out
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(access_level)


def record(**changes: object) -> RequestRecord:
    r = RequestRecord("a1b2c3-1f", "POST", "/openai/responses", provider="openai", session_hash="1a2b3c4d")
    r.tried, r.attempts, r.status, r.outcome, r.duration = ["openai#2", "openai#3"], 2, 200, "served", 0.01234
    for name, value in changes.items():
        setattr(r, name, value)
    return r


def configure(stream: Writes, fmt: str = "text", level: str = "info") -> logs.LineHandler:
    handler = logs.configure(Logging(format=fmt, level=level), known=lambda: SECRETS, stream=stream)
    assert isinstance(handler, logs.LineHandler)
    return handler


def both_ways(stream: Writes, access: logs.AccessLog, r: RequestRecord) -> tuple[str, str]:
    """The line written directly, then the line written through logging (a second handler is present)."""
    handler = configure(stream, "json" if access._json else "text")
    access(r)
    handler.flush()
    direct = stream.getvalue()
    stream.seek(0)
    stream.truncate()
    other = logging.NullHandler()
    logging.getLogger().addHandler(other)
    assert logs.sole_handler(logging.getLogger(logs.ACCESS)) is None
    access(r)
    handler.flush()
    logging.getLogger().removeHandler(other)
    return direct, stream.getvalue()


@pytest.mark.parametrize("error", ["", "the upstream sent no response headers in time"])
def test_the_direct_text_line_is_the_line_logging_writes(stream: Writes, error: str) -> None:
    direct, through_logging = both_ways(stream, logs.AccessLog(), record(error=error))
    assert STAMP.sub("", direct) == STAMP.sub("", through_logging)
    assert STAMP.match(direct)
    assert STAMP.match(through_logging)
    expected = (
        "INFO credproxy.access a1b2c3-1f openai POST /openai/responses -> 200 served session=1a2b3c4d "
        "credential=openai#3 tried=openai#2,openai#3 attempts=2 12.3ms"
    )
    assert STAMP.sub("", direct) == expected + (f" error={error!r}" if error else "") + "\n"


def test_the_direct_json_line_is_the_line_logging_writes(stream: Writes) -> None:
    direct, through_logging = both_ways(stream, logs.AccessLog(json=True), record(error="boom"))
    first, second = orjson.loads(direct), orjson.loads(through_logging)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", first.pop("time"))
    second.pop("time")
    assert first == second
    assert first == {
        "level": "info",
        "logger": "credproxy.access",
        "message": "request",
        "request_id": "a1b2c3-1f",
        "provider": "openai",
        "method": "POST",
        "path": "/openai/responses",
        "session": "1a2b3c4d",
        "credential": "openai#3",
        "tried": ["openai#2", "openai#3"],
        "attempts": 2,
        "status": 200,
        "outcome": "served",
        "duration_ms": 12.34,
        "error": "boom",
    }


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_secrets_in_a_path_or_an_error_are_masked_on_both_ways(stream: Writes, fmt: str) -> None:
    """Request-derived text (path, method, error) is redacted: known secrets and credential shapes."""
    shaped = "sk-proj-abcdefgh12345678"
    r = record(
        path=f"/openai/{POOL_SECRET}/x",
        method=f"GET{POOL_SECRET}",
        error=f'bad {CLIENT_TOKEN} and {shaped} and Bearer abcdefgh12345678 and "{POOL_SECRET}"',
        tried=[POOL_SECRET],
    )
    direct, through_logging = both_ways(stream, logs.AccessLog(json=fmt == "json"), r)
    for line in (direct, through_logging):
        for secret in (*SECRETS, shaped, "abcdefgh12345678"):
            assert secret not in line
        assert "/openai/***/x" in line
    if fmt == "text":
        assert STAMP.sub("", direct) == STAMP.sub("", through_logging)
    else:
        first, second = orjson.loads(direct), orjson.loads(through_logging)
        assert {**first, "time": ""} == {**second, "time": ""}
        assert first["tried"] == ["***"]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_traceback_is_redacted_like_the_message(stream: Writes, fmt: str) -> None:
    """The traceback text of a logged exception (its message quotes a token) is masked, and still written."""
    handler = configure(stream, fmt)
    shaped = "sk-proj-abcdefgh12345678"

    def fail(token: str) -> None:
        raise ValueError(f"the upstream echoed {token} and {shaped}")

    try:
        fail(POOL_SECRET)
    except ValueError:
        logging.getLogger("credproxy.test").exception("request failed for %s", "openai#1")
    handler.flush()
    line = stream.getvalue()
    for secret in (POOL_SECRET, shaped):
        assert secret not in line
    traceback = line if fmt == "text" else orjson.loads(line)["exception"]
    assert "Traceback (most recent call last)" in traceback
    assert "ValueError: the upstream echoed *** and ***" in traceback
    assert "request failed for openai#1" in line


def test_client_text_is_escaped_in_text_lines_both_ways(stream: Writes) -> None:
    """A decoded ``%0a`` cannot start a forged line, nor ``%1b[2J`` reach the terminal; a traceback keeps
    its own line breaks."""
    forged = "\n2026-01-01 00:00:00,000 INFO credproxy.access forged\x1b[2J\x00\x7f\x85\u2028\udcff"
    direct, through_logging = both_ways(stream, logs.AccessLog(), record(path=f"/openai/x{forged}", error=forged))
    for text in (direct, through_logging):
        [line] = text.splitlines()
        assert "/openai/x\\x0a2026-01-01 00:00:00,000 INFO credproxy.access forged\\x1b[2J\\x00\\x7f\\x85" in line
        assert "\\u2028\\udcff" in line
        assert line.isprintable()
    stream.seek(0)
    stream.truncate()
    handler = configure(stream)
    log = logging.getLogger("credproxy.test")
    log.warning("refused GET %s", f"/x{forged}")
    try:
        raise ValueError(f"bad path /x{forged}")
    except ValueError:
        log.exception("failed on %s", "/y\x1b[2J")
    handler.flush()
    lines = stream.getvalue().splitlines()
    assert [line[24:] for line in lines if line[:1].isdigit()] == [
        "WARNING credproxy.test refused GET /x\\x0a2026-01-01 00:00:00,000 INFO credproxy.access "
        "forged\\x1b[2J\\x00\\x7f\\x85\\u2028\\udcff",
        "ERROR credproxy.test failed on /y\\x1b[2J",
    ]
    assert "Traceback (most recent call last):" in lines
    assert "ValueError: bad path /x\\x0a2026-01-01" in stream.getvalue()
    assert all(line.isprintable() for line in lines)


async def test_a_block_is_logged_with_a_readable_time_and_the_seconds_left(
    proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="credproxy")
    fake.on(rate_limit(headers={"retry-after": "90"}), token="sk-test-alpha-0001")
    p = await proxy({"openai": [{"type": "api_key", "label": "alpha", "key": "sk-test-alpha-0001"}]})
    async with p.post("/openai/responses", json={"model": "m"}) as r:
        assert r.status == 429
    [line] = [r.getMessage() for r in caplog.records if r.name == "credproxy"]
    until = datetime.fromtimestamp(clock.time() + 90).astimezone().isoformat(timespec="seconds")
    expected = f"credential alpha limited (rate_limit_exceeded) until {until}, in 90 s (from retry-after)"
    assert line == f"{expected}; trying the next one"
    assert f"{clock.time() + 90:.0f}" not in line


def test_a_caplog_style_handler_sees_the_access_records(stream: Writes) -> None:
    configure(stream)
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    keep = Keep()
    logging.getLogger().addHandler(keep)
    try:
        logs.AccessLog()(record())
    finally:
        logging.getLogger().removeHandler(keep)
    assert [r.name for r in seen] == ["credproxy.access"]
    assert "served" in seen[0].getMessage()


def test_a_logger_filter_keeps_the_logging_path(stream: Writes) -> None:
    configure(stream)
    access = logging.getLogger(logs.ACCESS)
    dropped = logging.Filter("nothing.matches")
    access.addFilter(dropped)
    try:
        assert logs.sole_handler(access) is None
        logs.AccessLog()(record())
    finally:
        access.removeFilter(dropped)
    logging.getLogger().handlers[0].flush()
    assert stream.getvalue() == ""


def test_no_access_line_below_the_configured_level(stream: Writes) -> None:
    handler = configure(stream, level="warning")
    logs.AccessLog()(record())
    handler.flush()
    assert stream.getvalue() == ""


async def test_lines_of_one_loop_iteration_are_written_together(stream: Writes) -> None:
    handler = configure(stream)
    access, log = logs.AccessLog(), logging.getLogger("credproxy")
    access(record(request_id="r1"))
    log.warning("between")
    access(record(request_id="r2"))
    assert stream.getvalue() == ""  # not yet: at the end of this iteration
    await asyncio.sleep(0)
    lines = stream.getvalue().splitlines()
    assert [line.split(" ")[4] for line in lines] == ["r1", "between", "r2"]
    assert stream.calls == 1
    assert handler._flush_on is None


async def test_a_backlog_is_written_without_waiting_for_the_loop(stream: Writes) -> None:
    configure(stream)
    for i in range(logs.MAX_PENDING):
        logs.AccessLog()(record(request_id=f"r{i}"))
    assert len(stream.getvalue().splitlines()) == logs.MAX_PENDING
    assert stream.calls == 1


def test_without_a_loop_or_from_another_thread_a_line_is_written_at_once(stream: Writes) -> None:
    configure(stream)
    logs.AccessLog()(record(request_id="sync"))
    assert "sync" in stream.getvalue()
    thread = threading.Thread(target=lambda: logging.getLogger("credproxy").warning("from a thread"))
    thread.start()
    thread.join()
    assert "from a thread" in stream.getvalue()


def test_lines_left_by_a_closed_loop_are_not_held_back(stream: Writes) -> None:
    handler = configure(stream)
    loop = asyncio.new_event_loop()

    async def log_one() -> None:
        logs.AccessLog()(record(request_id="in-loop"))
        loop.stop()  # the write is due after this iteration, which never comes

    task = loop.create_task(log_one())
    loop.run_forever()
    assert task.done()
    loop.close()
    assert "in-loop" not in stream.getvalue()
    logging.getLogger("credproxy").warning("after the loop")
    lines = stream.getvalue().splitlines()
    assert ["in-loop" in lines[0], "after the loop" in lines[1]] == [True, True]
    assert handler._pending == []


async def test_flush_and_logging_shutdown_write_what_waits(stream: Writes) -> None:
    handler = configure(stream)
    logs.AccessLog()(record(request_id="waiting"))
    assert stream.getvalue() == ""
    logging.shutdown([lambda: handler])  # what runs at interpreter exit
    assert "waiting" in stream.getvalue()


def test_a_failing_stream_is_reported_not_raised(stream: Writes, capsys: pytest.CaptureFixture[str]) -> None:
    class Broken(io.StringIO):
        def write(self, text: str) -> int:
            raise OSError("disk full")

    handler = logs.configure(Logging(), stream=Broken())
    logs.AccessLog()(record())
    handler.flush()
    assert "1 log lines could not be written" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text",
    [
        "",
        "nothing to see",
        "sk-abcdefgh12345678",
        "key=sk-proj-abc_def-12345678 and more",
        "cpx_abcdefgh123",
        "eyJhbGciOiJI.eyJzdWIiOi.sig",
        "Authorization: Bearer abcdefgh.1234",
        "BEARER    abcdefgh12345678",
        "bEaReR\tabcdefgh12345678",
        "bearer short",
        "a sk-short",
        "Ünïcödé sk-abcdefgh12345678 İ K",
    ],
)
def test_redact_skips_the_regex_only_when_it_cannot_match(text: str) -> None:
    assert redact(text) == _PATTERNS.sub("***", text)


@pytest.mark.parametrize(
    "values",
    [
        [],
        ["plain"],
        ["a", POOL_SECRET, "b"],
        [f"x{POOL_SECRET}", "Bearer", "abcdefgh12345678"],  # a bearer value in the next field is not joined
        ["with\x00nul", f"and {CLIENT_TOKEN}"],
        ["", "", "sk-abcdefgh12345678"],
    ],
)
def test_redact_each_is_redact_value_by_value(values: list[str]) -> None:
    assert redact_each(values, SECRETS) == [redact(v, SECRETS) for v in values]


def test_redact_each_falls_back_when_a_secret_holds_a_nul() -> None:
    odd = ("a\x00b",)
    assert redact_each(["xa", "by"], odd) == ["xa", "by"]


def test_the_pools_known_secrets_follow_a_refresh_and_a_reload() -> None:
    """The redaction filter's list of secrets is cached; a rotated token must still be masked."""
    doc = {"codex": [{"type": "oauth", "access": "at-old-0001", "refresh": "rt-old-0001", "accountId": "a1"}]}
    creds = parse_credentials(Path("auth.json"), doc, ["codex"])
    provider = Provider(name="codex", mount="/codex", upstream=URL("https://example.invalid/backend-api/codex"))
    pool = Pool([provider], creds, ManualClock(1_800_000_000.0))
    assert set(pool.secrets()) == {"at-old-0001", "rt-old-0001"}
    [cred] = pool.credentials("codex")
    pool.update(replace(cred, token=Secret("at-new-0002"), refresh=Secret("rt-new-0002")))
    assert set(pool.secrets()) == {"at-new-0002", "rt-new-0002"}
    assert redact("refreshed: at-new-0002", pool.secrets()) == "refreshed: ***"
    fresh = parse_credentials(Path("auth.json"), {"codex": [{"type": "api_key", "key": "sk-reloaded-0003"}]}, ["codex"])
    pool.replace("codex", fresh["codex"])
    assert set(pool.secrets()) == {"sk-reloaded-0003"}
    assert redact("reloaded: sk-reloaded-0003", pool.secrets()) == "reloaded: ***"
