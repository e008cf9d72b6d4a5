"""Logging: one line per request, text or JSON, nothing secret in any line, and cheap to write.

:func:`configure` installs one handler on the root logger (:class:`LineHandler`, to stderr) with
:class:`RedactingFilter`, so every record, credproxy's or a library's, passes through
:func:`proxy.core.secret.redact` (with the pool's own tokens and the client tokens as known secrets) before
it is written: its message, its traceback and every string of its structured ``fields``. aiohttp's
report of a malformed request ("Error handling request" plus a traceback that quotes the start of the
offending header line, which may hold a token) becomes one INFO line that names the error class and
nothing else.

:class:`LineHandler` writes in batches. A line logged on the event loop's thread waits for the end of
the loop iteration, and every line logged in that iteration goes out in one write: a system call per
line was the largest single cost of a proxied request. Lines logged from other threads or with no
loop running, and a backlog of :data:`MAX_PENDING` lines, are written at once; ``flush()`` (which
``logging.shutdown`` calls at exit) and ``close()`` write whatever waits.

:class:`AccessLog` is an observer of :class:`~proxy.edge.forward.RequestRecord`: one structured line per
client request (request id, provider, session hash, credentials tried, attempts, status, duration).
When the records of ``credproxy.access`` would reach the :class:`LineHandler` of :func:`configure`
and nothing else (no other handler, no logger filter: the case in ``credproxy serve``), the line is
redacted and formatted directly, by the same formatter code and with the same known secrets, without
building a ``LogRecord``: it is the line the logging path would write, for a tenth of the cost.
Otherwise (a test's ``caplog``, an application's own handlers) it goes through ``logging`` like any
record.

A text line holds no control character: a path, a method, an error message carry what a client or an
upstream sent (a refused request's decoded path included, so no token is needed to put bytes there),
and ``%0a`` would start a forged line, ``%1b[2J`` clear the operator's terminal. :func:`printable`
shows each control character (and any other unprintable one, a lone surrogate included) as ``\\xNN``
or ``\\uNNNN``. A traceback keeps its line breaks, except one followed by a digit: an exception's
message may carry a client's text, and every text line starts with its time. JSON lines need nothing:
the encoder escapes them.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import orjson

from proxy.config import Logging
from proxy.core.secret import redact, redact_each
from proxy.observe.record import RequestRecord

ACCESS = "credproxy.access"
KnownSecrets = Callable[[], Sequence[str]]
#: Lines waiting for the end of a loop iteration before they are written at once anyway.
MAX_PENDING = 256


class RedactingFilter(logging.Filter):
    """Renders each record's message and traceback, then masks every secret in them and in its fields."""

    def __init__(self, known: KnownSecrets = tuple) -> None:
        super().__init__()
        self.known = known

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and record.name.startswith("aiohttp") and _malformed_request(exc):
            code = getattr(exc, "code", 400)
            record.msg, record.args = "refused a malformed request: %s (%s)", (type(exc).__name__, code)
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        known = self.known()
        message = redact(record.getMessage(), known)
        record.msg, record.args = message, None
        if record.exc_info:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info), known)
            record.exc_info = None
        if record.stack_info:
            record.stack_info = redact(record.stack_info, known)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            record.fields = redact_fields(fields, known)
        return True


def redact_fields(fields: dict[str, Any], known: Sequence[str]) -> dict[str, Any]:
    """``fields`` with every string value, and every string in a list value, redacted."""
    slots: list[tuple[str, int]] = []  # (name, index in a list value or -1)
    texts: list[str] = []
    for name, value in fields.items():
        if isinstance(value, str):
            slots.append((name, -1))
            texts.append(value)
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, str):
                    slots.append((name, index))
                    texts.append(item)
    clean = redact_each(texts, known)
    if clean is texts:
        return fields
    out = dict(fields)
    for (name, index), before, after in zip(slots, texts, clean, strict=True):
        if after == before:
            continue
        if index < 0:
            out[name] = after
        else:
            if out[name] is fields[name]:
                out[name] = list(fields[name])
            out[name][index] = after
    return out


class _Stamp:
    """``time.strftime`` of one second, made once per second (a log line costs a few µs, strftime 2)."""

    __slots__ = ("_cached", "_converter", "_format")

    def __init__(self, fmt: str, converter: Callable[[float | None], time.struct_time]) -> None:
        self._format = fmt
        self._converter = converter
        self._cached = (-1, "")  # one tuple, replaced whole: a reader in another thread sees a matching pair

    def __call__(self, second: int) -> str:
        cached = self._cached
        if cached[0] != second:
            cached = self._cached = (second, time.strftime(self._format, self._converter(second)))
        return cached[1]


def printable(text: str, keep: str = "") -> str:
    """``text`` with every unprintable character but those in ``keep`` escaped (``\\x1b``, ``\\u2028``)."""
    if text.isprintable():  # the common case, at C speed
        return text
    return "".join(c if c.isprintable() or c in keep else _escape(c) for c in text)


def _multiline(text: str) -> str:
    """A traceback made printable: line breaks kept, but none that would start a line like a log line's."""
    text = printable(text, "\n")
    return _FORGED_LINE.sub("\\\\x0a", text) if "\n" in text else text


_FORGED_LINE = re.compile(r"\n(?=\d)")


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


class TextFormatter(logging.Formatter):
    """``<time> <LEVEL> <logger> <message>``, unprintable characters escaped; :meth:`line` writes the same
    line without a record."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")
        self._stamp = _Stamp(self.default_time_format, self.converter)

    def formatMessage(self, record: logging.LogRecord) -> str:
        return f"{record.asctime} {record.levelname} {record.name} {printable(record.message)}"

    def formatException(self, ei: Any) -> str:
        return _multiline(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _multiline(stack_info)

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_text and not record.exc_info:
            # The redacting filter rendered the traceback already (formatException is not called again).
            record.exc_text = _multiline(record.exc_text)
        return super().format(record)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt:
            return super().formatTime(record, datefmt)
        return self.stamp(record.created)

    def stamp(self, created: float) -> str:
        """``formatTime``'s default: local time to the second, ``,`` and milliseconds (counted as LogRecord does)."""
        second = int(created)
        return f"{self._stamp(second)},{int((created - second) * 1000):03d}"

    def line(self, created: float, level: str, name: str, message: str, fields: dict[str, Any] | None = None) -> str:
        """The line :meth:`format` makes of a record without a traceback (``fields`` are not shown), for a
        ``message`` that is printable already (:func:`access_message` escapes what a client sent)."""
        return f"{self.stamp(created)} {level} {name} {message}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the record's ``fields``, its traceback."""

    def __init__(self) -> None:
        super().__init__()
        self._stamp = _Stamp("%Y-%m-%dT%H:%M:%S", self.converter)

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        return self.line(
            record.created,
            record.levelname,
            record.name,
            record.getMessage(),
            fields if isinstance(fields, dict) else None,
            record.exc_text,
        )

    def line(
        self,
        created: float,
        level: str,
        name: str,
        message: str,
        fields: dict[str, Any] | None = None,
        exception: str | None = None,
    ) -> str:
        doc: dict[str, Any] = {
            "time": self._stamp(int(created)),
            "level": level.lower(),
            "logger": name,
            "message": message,
        }
        if fields:
            doc.update(fields)
        if exception:
            doc["exception"] = exception
        return orjson.dumps(doc).decode()


class LineHandler(logging.StreamHandler[TextIO]):
    """A stream handler that writes the lines of one event loop iteration together (module docstring)."""

    def __init__(self, stream: TextIO, redactor: RedactingFilter) -> None:
        super().__init__(stream)
        self.redactor = redactor
        self.addFilter(redactor)
        self._pending: list[str] = []
        self._flush_on: asyncio.AbstractEventLoop | None = None  # the loop that will write the pending lines

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write_line(self.format(record))
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def write_line(self, line: str) -> None:
        """Queue one formatted, already redacted line."""
        with self.lock:  # type: ignore[union-attr]  # StreamHandler always has its lock
            pending = self._pending
            pending.append(line)
            if len(pending) < MAX_PENDING:
                loop = self._flush_on
                if loop is not None and not loop.is_closed():
                    return  # already due at the end of this loop iteration
                loop = _running_loop()
                if loop is not None:
                    self._flush_on = loop
                    loop.call_soon(self._flush_due)
                    return
            self._write()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write()
            super().flush()

    def close(self) -> None:
        self.flush()
        super().close()

    def _flush_due(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._flush_on = None
            self._write()

    def _write(self) -> None:
        pending = self._pending
        if not pending:
            return
        terminator = self.terminator
        text = terminator.join(pending) + terminator
        count = len(pending)
        pending.clear()
        try:
            self.stream.write(text)
            self.stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(logging.makeLogRecord({"msg": f"{count} log lines could not be written"}))


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _malformed_request(exc: BaseException) -> bool:
    """aiohttp's server refusing a request it cannot parse (its ``HttpProcessingError``, which aiohttp
    does not export publicly: recognised by its class name, with no import of aiohttp's internals)."""
    return any(cls.__name__ == "HttpProcessingError" for cls in type(exc).__mro__)


def configure(settings: Logging, known: KnownSecrets = tuple, stream: Any = None) -> logging.Handler:
    """Send every log record through the redacting filter to ``stream`` (stderr by default)."""
    handler = LineHandler(stream or sys.stderr, RedactingFilter(known))
    handler.setFormatter(JsonFormatter() if settings.format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.flush()
    root.addHandler(handler)
    root.setLevel(settings.level.upper())
    # No formatter shows a record's thread or process: not collecting them saves an os.getpid() and
    # more per record. (The access log, one line per request, does not go through records at all.)
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    # aiohttp's own access log duplicates ours; keep its warnings and errors only.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return handler


def sole_handler(logger: logging.Logger) -> LineHandler | None:
    """The :class:`LineHandler` of :func:`configure` when it alone would see ``logger``'s INFO records.

    ``None`` when anything else could see or change them: a filter on ``logger``, another handler on
    the way to the root, a handler level above INFO, other filters or another formatter on the handler.
    """
    if logger.filters:
        return None
    found: LineHandler | None = None
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            if found is not None or type(handler) is not LineHandler:
                return None
            found = handler
        if not current.propagate:
            break
        current = current.parent
    if (
        found is None
        or found.level > logging.INFO
        or len(found.filters) != 1
        or found.filters[0] is not found.redactor
        or type(found.formatter) not in (TextFormatter, JsonFormatter)
    ):
        return None
    return found


class AccessLog:
    """One line per client request on the ``credproxy.access`` logger."""

    def __init__(self, json: bool = False) -> None:
        self._log = logging.getLogger(ACCESS)
        self._json = json

    def __call__(self, record: RequestRecord) -> None:
        log = self._log
        if not log.isEnabledFor(logging.INFO):
            return
        fields: dict[str, Any] | None
        if self._json:
            message, fields = "request", access_fields(record)
        else:
            message, fields = access_message(record), None
        handler = sole_handler(log)
        if handler is None:
            log.info("%s", message, extra={"fields": fields} if fields else None)
            return
        known = handler.redactor.known()
        message = redact(message, known)
        if fields:
            fields = redact_fields(fields, known)
        formatter = handler.formatter
        assert isinstance(formatter, TextFormatter | JsonFormatter)  # sole_handler checked it
        handler.write_line(formatter.line(time.time(), logging.getLevelName(logging.INFO), ACCESS, message, fields))


def _credential(record: RequestRecord) -> str:
    """The credential that answered; none when every one was blocked before sending."""
    return record.tried[-1] if record.tried and record.outcome != "no_credential" else ""


def access_fields(record: RequestRecord) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "request_id": record.request_id,
        "provider": record.provider,
        "method": record.method,
        "path": record.path,
        "session": record.session_hash,
        "credential": _credential(record),
        "tried": record.tried,
        "attempts": record.attempts,
        "status": record.status,
        "outcome": record.outcome,
        "duration_ms": round(record.duration * 1000, 2),
    }
    if record.error:
        fields["error"] = record.error
    return fields


def access_message(record: RequestRecord) -> str:
    """The text line of a request; what a client sent (method, path; the error is a ``repr``) is escaped."""
    error = f" error={record.error!r}" if record.error else ""
    return (
        f"{record.request_id} {record.provider or '-'} {printable(record.method)} {printable(record.path)} "
        f"-> {record.status} "
        f"{record.outcome} session={record.session_hash or '-'} credential={_credential(record) or '-'} "
        f"tried={','.join(record.tried) or '-'} attempts={record.attempts} {record.duration * 1000:.1f}ms{error}"
    )
