"""The one config path: a JSON file becomes a frozen :class:`Config`, or a :class:`ConfigError`.

Every key is checked: unknown keys, wrong types and bad values refuse to start with a message that
names the file and the key (``config.json at providers.openai.upstream: ...``). Relative paths are
relative to the config file. JSON has no comments, so any key starting with ``$comment`` is ignored;
``config.example.json`` uses them to explain every key.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import orjson
from yarl import URL

from proxy.errors import ConfigError

T = TypeVar("T")

DEFAULT_PORT = 8787
ADMIN_PREFIX = "/_credproxy"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SEGMENT = re.compile(r"[A-Za-z0-9._~-]+")
_SELECTORS = ("hashed", "rendezvous")
_KINDS = ("openai", "codex")
#: Upstream transports (``proxy.fasttransport`` and ``proxy.upstream``); the first is the default.
TRANSPORTS = ("fast", "aiohttp")


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


@dataclass(frozen=True, slots=True)
class Logging:
    format: str = "text"
    level: str = "info"


@dataclass(frozen=True, slots=True)
class Provider:
    name: str
    mount: str
    upstream: URL
    kind: str = "openai"
    selector: str = "hashed"


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    credentials_file: Path
    providers: tuple[Provider, ...]
    listen: Listen = field(default_factory=Listen)
    limits: Limits = field(default_factory=Limits)
    logging: Logging = field(default_factory=Logging)
    transport: str = TRANSPORTS[0]

    def provider(self, name: str) -> Provider:
        for provider in self.providers:
            if provider.name == name:
                return provider
        raise KeyError(name)


class _Reader:
    """Typed access to one JSON object of the config, with errors that name file and key."""

    def __init__(self, path: Path, doc: Mapping[str, Any], where: str, allowed: tuple[str, ...]) -> None:
        self.path, self.doc, self.where = path, doc, where
        for key in doc:
            if key not in allowed and not key.startswith("$comment"):
                raise ConfigError(path, self.key(key), f"unknown key (expected one of: {', '.join(allowed)})")

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def fail(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.path, self.key(name), problem)

    def get(self, name: str, kind: type[T] | tuple[type, ...], default: T, what: str) -> T:
        if name not in self.doc:
            return default
        value = self.doc[name]
        if isinstance(value, bool) and kind is not bool:
            raise self.fail(name, f"must be {what}, not a boolean")
        if not isinstance(value, kind):
            raise self.fail(name, f"must be {what}, not {type(value).__name__}")
        return value  # type: ignore[return-value]

    def number(self, name: str, default: float, low: float, high: float) -> float:
        value = float(self.get(name, (int, float), default, "a number"))
        if not low <= value <= high:
            raise self.fail(name, f"must be between {low:g} and {high:g}")
        return value

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        value = self.get(name, int, default, "an integer")
        if not low <= value <= high:
            raise self.fail(name, f"must be between {low} and {high}")
        return value

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.get(name, str, default, "a string")
        if value not in choices:
            raise self.fail(name, f"must be one of {', '.join(choices)}")
        return value

    def section(self, name: str, allowed: tuple[str, ...]) -> _Reader:
        value = self.get(name, dict, {}, "an object")
        return _Reader(self.path, value, self.key(name), allowed)


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
    return parse_config(path, doc)


def parse_config(path: Path, doc: Mapping[str, Any]) -> Config:
    top = _Reader(path, doc, "", ("listen", "credentials_file", "providers", "limits", "logging", "transport"))
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

    providers_doc = top.get("providers", dict, {}, "an object")
    if not any(not name.startswith("$comment") for name in providers_doc):
        raise top.fail("providers", "configure at least one provider")
    providers = tuple(
        _provider(_Reader(path, _as_object(path, f"providers.{name}", spec), f"providers.{name}", _PROVIDER_KEYS), name)
        for name, spec in providers_doc.items()
        if not name.startswith("$comment")
    )
    _check_mounts(path, providers)

    return Config(
        path=path,
        credentials_file=(base / credentials_file).resolve(),
        providers=providers,
        listen=Listen(host=host, port=port),
        limits=limits,
        logging=log,
        transport=top.choice("transport", TRANSPORTS[0], TRANSPORTS),
    )


_PROVIDER_KEYS = ("mount", "upstream", "kind", "selector")


def _as_object(path: Path, key: str, value: object) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(path, key, f"must be an object, not {type(value).__name__}")
    return value


def _limits(section: _Reader) -> Limits:
    d = Limits()
    return Limits(
        max_body_bytes=section.integer("max_body_bytes", d.max_body_bytes, 1024, 1 << 30),
        max_session_id_length=section.integer("max_session_id_length", d.max_session_id_length, 16, 4096),
        connect_timeout=section.number("connect_timeout", d.connect_timeout, 0.01, 300),
        header_timeout=section.number("header_timeout", d.header_timeout, 0.01, 3600),
        idle_timeout=section.number("idle_timeout", d.idle_timeout, 0.01, 3600),
        connect_retry_delay=section.number("connect_retry_delay", d.connect_retry_delay, 0, 10),
    )


def _provider(section: _Reader, name: str) -> Provider:
    if not _NAME.fullmatch(name):
        raise ConfigError(section.path, section.where, "provider names use letters, digits, '.', '_' and '-'")
    if "mount" not in section.doc:
        raise section.fail("mount", 'is required (for example "/openai")')
    if "upstream" not in section.doc:
        raise section.fail("upstream", 'is required (for example "https://api.openai.com/v1")')
    mount = _mount(section, section.get("mount", str, "", "a string"))
    upstream = _upstream(section, section.get("upstream", str, "", "a string"))
    default_kind = "codex" if name == "openai-codex" or "/backend-api" in upstream.path else "openai"
    return Provider(
        name=name,
        mount=mount,
        upstream=upstream,
        kind=section.choice("kind", default_kind, _KINDS),
        selector=section.choice("selector", "hashed", _SELECTORS),
    )


def _mount(section: _Reader, mount: str) -> str:
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


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _upstream(section: _Reader, text: str) -> URL:
    try:
        url = URL(text)
    except (ValueError, TypeError):
        raise section.fail("upstream", "is not a valid URL") from None
    if not url.is_absolute() or url.scheme not in ("http", "https") or not url.host:
        raise section.fail("upstream", "must be an absolute http(s) URL such as https://api.openai.com/v1")
    if url.user is not None or url.password is not None:
        raise section.fail("upstream", "must not contain user:password@ (credentials come from the credentials file)")
    if url.query_string or url.fragment:
        raise section.fail("upstream", "must not have a query string or fragment")
    if url.scheme == "http" and not _is_loopback(url.host):
        raise section.fail("upstream", "must use https (plain http is allowed only for loopback test upstreams)")
    return url.with_path(url.path.rstrip("/"))


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


def find_provider(providers: tuple[Provider, ...]) -> Callable[[str], tuple[Provider, str] | None]:
    """A function from a raw request path to ``(provider, rest)``, or ``None`` when nothing is mounted there."""
    table = {p.mount: p for p in providers}
    depth = max((p.mount.count("/") for p in providers), default=1)

    def lookup(raw_path: str) -> tuple[Provider, str] | None:
        # Try the mount made of the first 1..depth segments; mounts never overlap, so at most one matches.
        end = 0
        for _ in range(depth):
            end = raw_path.find("/", end + 1)
            prefix = raw_path if end == -1 else raw_path[:end]
            provider = table.get(prefix)
            if provider is not None:
                return provider, raw_path[len(prefix) :]
            if end == -1:
                return None
        return None

    return lookup
