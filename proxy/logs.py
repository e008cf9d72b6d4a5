"""Logging: one line per request, text or JSON, and nothing secret in any line.

:func:`configure` installs one stderr handler on the root logger with :class:`RedactingFilter`, so
every record, credproxy's or a library's, passes through :func:`proxy.secret.redact` (with the
pool's own tokens as known secrets) before it is written. aiohttp's report of a malformed request
("Error handling request" plus a traceback that quotes the start of the offending header line,
which may hold a token) becomes one INFO line that names the error class and nothing else.

:class:`AccessLog` is an observer of :class:`~proxy.forward.RequestRecord`: one structured line per
client request (request id, provider, session hash, credentials tried, attempts, status, duration).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable
from typing import Any

import orjson
from aiohttp.http_exceptions import HttpProcessingError

from proxy.config import Logging
from proxy.forward import RequestRecord
from proxy.secret import redact

ACCESS = "credproxy.access"
KnownSecrets = Callable[[], Iterable[str]]


class RedactingFilter(logging.Filter):
    """Renders each record's message and traceback, then masks every secret in them."""

    def __init__(self, known: KnownSecrets = tuple) -> None:
        super().__init__()
        self._known = known

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if record.name.startswith("aiohttp") and isinstance(exc, HttpProcessingError):
            record.msg, record.args = "refused a malformed request: %s (%s)", (type(exc).__name__, exc.code)
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        known = list(self._known())
        message = redact(record.getMessage(), known)
        record.msg, record.args = message, None
        if record.exc_info:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info), known)
            record.exc_info = None
        if record.stack_info:
            record.stack_info = redact(record.stack_info, known)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            doc.update(fields)
        if record.exc_text:
            doc["exception"] = record.exc_text
        return orjson.dumps(doc).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")


def configure(settings: Logging, known: KnownSecrets = tuple, stream: Any = None) -> logging.Handler:
    """Send every log record through the redacting filter to ``stream`` (stderr by default)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RedactingFilter(known))
    handler.setFormatter(JsonFormatter() if settings.format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.level.upper())
    # No formatter shows a record's thread, process or source line: not collecting them saves more
    # than half of an access line's cost (os.getpid() and a frame walk per record).
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None
    # aiohttp's own access log duplicates ours; keep its warnings and errors only.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return handler


class AccessLog:
    """One line per client request on the ``credproxy.access`` logger."""

    def __init__(self, json: bool = False) -> None:
        self._log = logging.getLogger(ACCESS)
        self._json = json

    def __call__(self, record: RequestRecord) -> None:
        if not self._log.isEnabledFor(logging.INFO):
            return
        fields = {
            "request_id": record.request_id,
            "provider": record.provider,
            "method": record.method,
            "path": record.path,
            "session": record.session_hash,
            # The credential that answered; none when every one was blocked before sending.
            "credential": record.tried[-1] if record.tried and record.outcome != "no_credential" else "",
            "tried": record.tried,
            "attempts": record.attempts,
            "status": record.status,
            "outcome": record.outcome,
            "duration_ms": round(record.duration * 1000, 2),
        }
        if record.error:
            fields["error"] = record.error
        if self._json:
            self._log.info("request", extra={"fields": fields})
            return
        self._log.info(
            "%s %s %s %s -> %d %s session=%s credential=%s tried=%s attempts=%d %.1fms%s",
            record.request_id,
            record.provider or "-",
            record.method,
            record.path,
            record.status,
            record.outcome,
            record.session_hash or "-",
            fields["credential"] or "-",
            ",".join(record.tried) or "-",
            record.attempts,
            record.duration * 1000,
            f" error={record.error!r}" if record.error else "",
        )
