"""Every exception credproxy raises on purpose, in one tree.

    CredproxyError                 base; ``status`` is the HTTP status a client would see
    ├── ConfigError                bad config or credentials file: refuse to start (names key and file)
    ├── StoreError                 credentials/state file I/O failed (locked, unreadable, unwritable)
    ├── RequestRejected            malformed client request: a 4xx before any upstream contact
    ├── NoCredentialAvailable      every credential is blocked (429 + Retry-After) or none is usable (503)
    └── UpstreamError              the upstream failed; never carries a secret
        ├── ConnectFailed          the request never left (refused, DNS, TLS): safe to try again
        ├── HeaderTimeout          no response headers in time (504, not replayed)
        ├── UpstreamReset          sent, but no response came back (502, not replayed)
        └── StreamBroken           the body broke after the response began (client sees an abort)

Exceptions of aiohttp and of the OS are translated into this tree at one boundary each
(``proxy.edge.transport`` for the network, ``proxy.storage.files`` for files).
"""

from __future__ import annotations


class CredproxyError(Exception):
    """Base class. ``status`` is a hint for the HTTP status a client would get."""

    status = 500


class ConfigError(CredproxyError):
    """A config or credentials file is invalid; the message names the file and the key."""

    def __init__(self, path: object, key: str, problem: str) -> None:
        self.path = str(path)
        self.key = key
        self.problem = problem
        where = f" at {key}" if key else ""
        super().__init__(f"{self.path}{where}: {problem}")


class StoreError(CredproxyError):
    """Reading or writing a file the proxy owns failed."""


class StoreLocked(StoreError):
    """Another process holds the file lock longer than our timeout (never reported as 'no credentials')."""


class RequestRejected(CredproxyError):
    """The client's request is refused before any upstream contact."""

    def __init__(self, status: int, message: str, code: str = "invalid_request") -> None:
        self.status = status
        self.code = code
        super().__init__(message)


class NoCredentialAvailable(CredproxyError):
    """No credential can serve the request now.

    ``retry_at`` is the epoch second of the earliest unblock, or ``None`` when no credential
    will come back on its own (empty pool, all disabled or needing a re-login).
    """

    def __init__(self, provider: str, retry_at: float | None, detail: str) -> None:
        self.provider = provider
        self.retry_at = retry_at
        self.status = 429 if retry_at is not None else 503
        super().__init__(detail)


class UpstreamError(CredproxyError):
    status = 502


class ConnectFailed(UpstreamError):
    """The request provably never left: connection refused, DNS or TLS failure."""


class HeaderTimeout(UpstreamError):
    status = 504


class UpstreamReset(UpstreamError):
    """The request may have been processed, but no response arrived."""


class StreamBroken(UpstreamError):
    """The response body ended early or broke after the response had started."""
