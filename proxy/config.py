"""The one config path: a JSON file becomes a frozen :class:`Config`, or a :class:`ConfigError`.

Every key is checked: unknown keys, wrong types and bad values refuse to start with a message that
names the file and the key (``config.json at providers.openai.upstream: ...``). Relative paths are
relative to the config file. JSON has no comments, so any key starting with ``$comment`` is ignored;
``config.example.json`` uses them to explain every key.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import orjson
from yarl import URL

from proxy.config_section import Section, as_object
from proxy.core.guard import host_entry_problem, origin_problem, token_problem
from proxy.core.secret import Secret
from proxy.errors import ConfigError
from proxy.storage.private_files import check_private

T = TypeVar("T")

DEFAULT_PORT = 8787
DEFAULT_TOKEN_URL = URL("https://auth.openai.com/oauth/token")
CODEX_CLIENT_ID = "app_EMoamEEZ73f0CkXaXp7hrann"
ADMIN_PREFIX = "/_credproxy"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SEGMENT = re.compile(r"[A-Za-z0-9._~-]+")
_SELECTORS = ("hashed", "rendezvous")
_KINDS = ("openai", "codex", "anthropic")
ANTHROPIC_HOST = "api.anthropic.com"
_PREFIX = re.compile(r"[\x21-\x7e]{1,64}")
#: Upstream transports (``proxy.edge.fast_transport`` and ``proxy.edge.aiohttp_transport``); the first is the default.
TRANSPORTS = ("fast", "aiohttp")
#: Servers for proxied requests (``proxy.edge.fast_server``, or aiohttp's for every request); the first is the default.
SERVERS = ("fast", "aiohttp")


@dataclass(frozen=True, slots=True)
class Listen:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT


@dataclass(frozen=True, slots=True)
class Limits:
    """Request limits and upstream timeouts (seconds)."""

    max_body_bytes: int = 32 * 1024 * 1024
    max_session_id_length: int = 256
    connect_timeout: float = 10.0
    header_timeout: float = 600.0
    idle_timeout: float = 300.0
    connect_retry_delay: float = 0.25
    shutdown_grace: float = 30.0
    # The client side (proxy/edge/server.py): what one connection may cost before it is cut.
    client_header_timeout: float = 10.0
    client_body_timeout: float = 60.0
    client_keepalive_timeout: float = 75.0
    max_client_connections: int = 0  # 0: derived from the open-files limit (proxy.server.connection_cap)
    max_request_line_bytes: int = 8190
    max_header_bytes: int = 8190
    max_headers: int = 128
    # The Responses WebSocket bridge (proxy/edge/websocket.py).
    websocket_max_message_bytes: int = 32 * 1024 * 1024  # one frame, or one message (fragments, inflated)
    websocket_idle_timeout: float = 300.0  # a socket with no frame either way for this long is closed
    max_websockets: int = 0  # 0: half the connection cap (proxy.edge.server.connection_cap)


@dataclass(frozen=True, slots=True)
class Logging:
    format: str = "text"
    level: str = "info"


@dataclass(frozen=True, slots=True)
class Security:
    """Who may use the proxy (see :mod:`proxy.core.guard`). Tokens are on when either token key is set."""

    client_tokens: tuple[Secret, ...] = ()
    client_token_file: Path | None = None
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()

    @property
    def tokens_configured(self) -> bool:
        return bool(self.client_tokens) or self.client_token_file is not None


@dataclass(frozen=True, slots=True)
class State:
    """Where credential state is shared: ``file`` (memory plus the state file) or ``redis`` (several replicas)."""

    backend: str = "file"
    url: str = ""  # redis://host:port/db, rediss://... (TLS) or unix:///path; may hold a password: never logged
    key_prefix: str = "credproxy:"
    timeout: float = 1.0  # every Redis call (connect and read); Redis never makes a request wait longer
    lock_ttl: float = 10.0  # the refresh lock expires this long after its holder stops renewing it
    usage_ttl: float = 3600.0  # usage snapshots expire from Redis this long after they were written
    poll_interval: float = 5.0  # full re-read of the shared state, behind the pub/sub notifications


@dataclass(frozen=True, slots=True)
class Provider:
    name: str
    mount: str
    upstream: URL
    kind: str = "openai"
    selector: str = "hashed"
    #: ChatGPT/Codex accounts: where to refresh tokens and read usage (tests point them at a fake).
    token_url: URL = DEFAULT_TOKEN_URL
    client_id: str = CODEX_CLIENT_ID
    usage_url: URL | None = None
    #: Above this percentage of any usage window, a credential gets no new sessions while another has headroom.
    soft_limit_percent: float | None = None
    #: Serve the Responses WebSocket (False: answer an upgrade with 426, so that clients use HTTP at once).
    websocket: bool = True


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    credentials_file: Path
    providers: tuple[Provider, ...]
    listen: Listen = field(default_factory=Listen)
    limits: Limits = field(default_factory=Limits)
    logging: Logging = field(default_factory=Logging)
    security: Security = field(default_factory=Security)
    state: State = field(default_factory=State)
    transport: str = TRANSPORTS[0]
    server: str = SERVERS[0]

    @property
    def kinds(self) -> dict[str, str]:
        """Provider name -> kind (what the credentials file's entries are checked against)."""
        return {p.name: p.kind for p in self.providers}

    def provider(self, name: str) -> Provider:
        for provider in self.providers:
            if provider.name == name:
                return provider
        raise KeyError(name)


def load_config(path: str | Path) -> Config:
    """Read and validate the config file at ``path``."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read the config file ({exc.strerror or exc})") from None
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ConfigError(path, "", f"not valid JSON (line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(doc, dict):
        raise ConfigError(path, "", "the config must be a JSON object")
    config = parse_config(path, doc)
    if config.security.client_tokens:
        check_private(path, "config file (it holds security.client_tokens)")
    if config.state.backend == "redis" and URL(config.state.url).password:
        check_private(path, "config file (state.url holds the Redis password)")
    return config


_TOP_KEYS = ("listen", "credentials_file", "providers", "limits", "logging", "security", "state", "transport", "server")


def parse_config(path: Path, doc: Mapping[str, Any]) -> Config:
    top = Section(path, doc, "", _TOP_KEYS)
    base = path.parent

    listen = top.section("listen", ("host", "port"))
    host = listen.get("host", str, "127.0.0.1", "a string")
    if not host:
        raise listen.fail("host", "must not be empty")
    port = listen.integer("port", DEFAULT_PORT, 0, 65535)

    credentials_file = top.get("credentials_file", str, "auth.json", "a path string")
    if not credentials_file:
        raise top.fail("credentials_file", "must not be empty")

    limits = _limits(top.section("limits", tuple(f.name for f in fields(Limits))))

    logging = top.section("logging", ("format", "level"))
    log = Logging(
        format=logging.choice("format", "text", ("text", "json")),
        level=logging.choice("level", "info", ("debug", "info", "warning", "error")),
    )

    state = _state(top.section("state", tuple(f.name for f in fields(State))))

    providers_doc = top.get("providers", dict, {}, "an object")
    if not any(not name.startswith("$comment") for name in providers_doc):
        raise top.fail("providers", "configure at least one provider")
    providers = tuple(
        _provider(Section(path, as_object(path, f"providers.{name}", spec), f"providers.{name}", _PROVIDER_KEYS), name)
        for name, spec in providers_doc.items()
        if not name.startswith("$comment")
    )
    _check_mounts(path, providers)

    config = Config(
        path=path,
        credentials_file=(base / credentials_file).resolve(),
        providers=providers,
        listen=Listen(host=host, port=port),
        limits=limits,
        logging=log,
        security=_security(top.section("security", _SECURITY_KEYS), base),
        state=state,
        transport=top.choice("transport", TRANSPORTS[0], TRANSPORTS),
        server=top.choice("server", SERVERS[0], SERVERS),
    )
    check_listen(config)
    return config


def check_listen(config: Config, host: str | None = None, flag: str = "") -> None:
    """Refuse a non-loopback listen address unless client tokens are configured.

    ``host`` overrides ``config.listen.host`` (the ``--host`` option; ``flag`` names it in the message).
    """
    host = config.listen.host if host is None else host
    if is_loopback(host) or config.security.tokens_configured:
        return
    given = f"{flag} {host}" if flag else host
    raise ConfigError(
        config.path,
        "listen.host",
        f"{given} is not a loopback address: other machines or containers could spend your credentials. "
        "Listening there requires client tokens: run `credproxy init` and set security.client_token_file "
        '(or listen on "127.0.0.1")',
    )


_SECURITY_KEYS = ("client_tokens", "client_token_file", "allowed_hosts", "allowed_origins")


def _security(section: Section, base: Path) -> Security:
    token_file = section.get("client_token_file", str, "", "a path string")
    if "client_token_file" in section.doc and not token_file:
        raise section.fail("client_token_file", "must not be empty")
    return Security(
        client_tokens=tuple(Secret(t) for t in section.strings("client_tokens", token_problem)),
        client_token_file=(base / token_file).resolve() if token_file else None,
        allowed_hosts=tuple(h.lower() for h in section.strings("allowed_hosts", host_entry_problem)),
        allowed_origins=tuple(o.lower() for o in section.strings("allowed_origins", origin_problem)),
    )


_PROVIDER_KEYS = (
    "mount",
    "upstream",
    "kind",
    "selector",
    "token_url",
    "client_id",
    "usage_url",
    "soft_limit_percent",
    "websocket",
)
#: Provider kinds whose upstream has a Responses WebSocket.
WEBSOCKET_KINDS = ("openai", "codex")


def _limits(section: Section) -> Limits:
    d = Limits()
    return Limits(
        max_body_bytes=section.integer("max_body_bytes", d.max_body_bytes, 1024, 1 << 30),
        max_session_id_length=section.integer("max_session_id_length", d.max_session_id_length, 16, 4096),
        connect_timeout=section.number("connect_timeout", d.connect_timeout, 0.01, 300),
        header_timeout=section.number("header_timeout", d.header_timeout, 0.01, 3600),
        idle_timeout=section.number("idle_timeout", d.idle_timeout, 0.01, 3600),
        connect_retry_delay=section.number("connect_retry_delay", d.connect_retry_delay, 0, 10),
        shutdown_grace=section.number("shutdown_grace", d.shutdown_grace, 0, 3600),
        client_header_timeout=section.number("client_header_timeout", d.client_header_timeout, 0.01, 3600),
        client_body_timeout=section.number("client_body_timeout", d.client_body_timeout, 0.01, 3600),
        client_keepalive_timeout=section.number("client_keepalive_timeout", d.client_keepalive_timeout, 0.01, 3600),
        max_client_connections=section.integer("max_client_connections", d.max_client_connections, 0, 1_000_000),
        max_request_line_bytes=section.integer("max_request_line_bytes", d.max_request_line_bytes, 256, 1 << 20),
        max_header_bytes=section.integer("max_header_bytes", d.max_header_bytes, 256, 1 << 20),
        max_headers=section.integer("max_headers", d.max_headers, 8, 10_000),
        websocket_max_message_bytes=section.integer(
            "websocket_max_message_bytes", d.websocket_max_message_bytes, 1024, 1 << 30
        ),
        websocket_idle_timeout=section.number("websocket_idle_timeout", d.websocket_idle_timeout, 0.01, 86400),
        max_websockets=section.integer("max_websockets", d.max_websockets, 0, 1_000_000),
    )


_REDIS_SCHEMES = ("redis", "rediss", "unix")


def _state(section: Section) -> State:
    d = State()
    if "backend" not in section.doc and any(not k.startswith("$comment") for k in section.doc):
        # Redis settings without a backend would silently mean "no Redis": make the choice explicit.
        raise section.fail("backend", 'is required with Redis settings: "redis" to use them, "file" not to')
    backend = section.choice("backend", d.backend, ("file", "redis"))
    if backend == "redis" and "url" not in section.doc:
        raise section.fail("url", 'is required with "backend": "redis" (for example "redis://127.0.0.1:6379/0")')
    prefix = section.get("key_prefix", str, d.key_prefix, "a string")
    if not _PREFIX.fullmatch(prefix):
        raise section.fail("key_prefix", "must be 1-64 visible ASCII characters without spaces")
    return State(
        backend=backend,
        url=_redis_url(section, section.get("url", str, "", "a URL string")) if "url" in section.doc else "",
        key_prefix=prefix,
        timeout=section.number("timeout", d.timeout, 0.05, 30),
        lock_ttl=section.number("lock_ttl", d.lock_ttl, 1, 300),
        usage_ttl=section.number("usage_ttl", d.usage_ttl, 60, 8 * 86400),
        poll_interval=section.number("poll_interval", d.poll_interval, 0.1, 300),
    )


def _redis_url(section: Section, text: str) -> str:
    # Problems are described without echoing the URL: it may carry a password.
    try:
        url = URL(text)
    except (ValueError, TypeError):
        raise section.fail("url", "is not a valid URL") from None
    if url.scheme not in _REDIS_SCHEMES:
        raise section.fail("url", "must start with redis://, rediss:// (TLS) or unix://")
    if url.query_string or url.fragment:
        raise section.fail("url", "must not have a query string or fragment (timeouts are keys of this section)")
    if url.scheme == "unix":
        if not url.path or url.path == "/":
            raise section.fail("url", "must name the socket: unix:///run/redis/redis.sock")
        return text
    if not url.host:
        raise section.fail("url", "must name a host: redis://127.0.0.1:6379/0")
    if url.path not in ("", "/") and not re.fullmatch(r"/\d{1,2}", url.path):
        raise section.fail("url", "the path is the database number: redis://host:6379/0")
    return text


def _provider(section: Section, name: str) -> Provider:
    if not _NAME.fullmatch(name):
        raise ConfigError(section.path, section.where, "provider names use letters, digits, '.', '_' and '-'")
    if "mount" not in section.doc:
        raise section.fail("mount", 'is required (for example "/openai")')
    if "upstream" not in section.doc:
        raise section.fail("upstream", 'is required (for example "https://api.openai.com/v1")')
    mount = _mount(section, section.get("mount", str, "", "a string"))
    upstream = _upstream(section, section.get("upstream", str, "", "a string"))
    kind = section.choice("kind", default_kind(name, upstream), _KINDS)
    token_url = section.get("token_url", str, "", "a URL string")
    usage_url = section.get("usage_url", str, "", "a URL string")
    soft = section.get("soft_limit_percent", (int, float, type(None)), None, "a number or null")
    if soft is not None and not 1 <= soft <= 100:
        raise section.fail("soft_limit_percent", "must be between 1 and 100")
    client_id = section.get("client_id", str, CODEX_CLIENT_ID, "a string")
    return Provider(
        name=name,
        mount=mount,
        upstream=upstream,
        kind=kind,
        selector=section.choice("selector", "hashed", _SELECTORS),
        token_url=_url(section, "token_url", token_url) if token_url else DEFAULT_TOKEN_URL,
        client_id=client_id,
        usage_url=_url(section, "usage_url", usage_url) if usage_url else default_usage_url(upstream, kind),
        soft_limit_percent=float(soft) if soft is not None else None,
        websocket=_websocket(section, kind),
    )


def _websocket(section: Section, kind: str) -> bool:
    served = section.get("websocket", bool, kind in WEBSOCKET_KINDS, "true or false")
    if served and kind not in WEBSOCKET_KINDS:
        raise section.fail("websocket", f"a provider of kind {kind} has no WebSocket upstream; remove the key")
    return served


def default_kind(name: str, upstream: URL) -> str:
    """``codex`` for ``openai-codex`` or a ``/backend-api`` upstream, ``anthropic`` for ``anthropic`` or an
    upstream on api.anthropic.com, else ``openai``."""
    if name == "openai-codex" or "/backend-api" in upstream.path:
        return "codex"
    if name == "anthropic" or upstream.host == ANTHROPIC_HOST:
        return "anthropic"
    return "openai"


def default_usage_url(upstream: URL, kind: str) -> URL | None:
    """The usage endpoint of a Codex upstream (protocol.md 10): ``.../backend-api/wham/usage``."""
    if kind != "codex":
        return None
    path = upstream.path
    if "/backend-api" in path:
        return upstream.with_path(path[: path.index("/backend-api") + len("/backend-api")] + "/wham/usage")
    return upstream.with_path(path.rstrip("/") + "/api/codex/usage")


def _mount(section: Section, mount: str) -> str:
    mount = mount.rstrip("/")
    segments = mount.split("/")[1:]
    if (
        not mount.startswith("/")
        or not segments
        or any(not _SEGMENT.fullmatch(s) or s in (".", "..") for s in segments)
    ):
        raise section.fail("mount", "must be a path such as \"/openai\" (letters, digits, '.', '_', '-', '~')")
    if mount == ADMIN_PREFIX or mount.startswith(ADMIN_PREFIX + "/"):
        raise section.fail("mount", f"{ADMIN_PREFIX} is reserved for credproxy's own endpoints")
    return mount


def is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url(section: Section, key: str, text: str) -> URL:
    try:
        url = URL(text)
    except (ValueError, TypeError):
        raise section.fail(key, "is not a valid URL") from None
    if not url.is_absolute() or url.scheme not in ("http", "https") or not url.host:
        raise section.fail(key, "must be an absolute http(s) URL such as https://api.openai.com/v1")
    if url.user is not None or url.password is not None:
        raise section.fail(key, "must not contain user:password@ (credentials come from the credentials file)")
    if url.query_string or url.fragment:
        raise section.fail(key, "must not have a query string or fragment")
    if url.scheme == "http" and not is_loopback(url.host):
        raise section.fail(key, "must use https (plain http is allowed only for loopback test upstreams)")
    return url.with_path(url.path.rstrip("/"))


def _upstream(section: Section, text: str) -> URL:
    return _url(section, "upstream", text)


def _check_mounts(path: Path, providers: tuple[Provider, ...]) -> None:
    seen: dict[str, str] = {}
    for provider in providers:
        for other_mount, other in seen.items():
            a, b = provider.mount + "/", other_mount + "/"
            if a == b:
                raise ConfigError(
                    path, f"providers.{provider.name}.mount", f"{provider.mount} is also the mount of {other}"
                )
            if a.startswith(b) or b.startswith(a):
                raise ConfigError(
                    path,
                    f"providers.{provider.name}.mount",
                    f"{provider.mount} overlaps the mount {other_mount} of {other}",
                )
        seen[provider.mount] = provider.name
