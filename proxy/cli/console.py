"""The operator's commands: ``credproxy status``, ``which`` and ``check``.

``status`` and ``which`` ask a running proxy over HTTP (its ``/_credproxy/`` endpoints) and print
what it answers; ``check`` reads the config and credentials files the way ``serve`` would and
prints what would be served. None of them ever prints a token: the proxy's answers hold none, and
``check`` prints labels and kinds only.

The HTTP client is the standard library's, with environment proxies switched off (an
``http_proxy`` variable must not send a request for ``127.0.0.1`` elsewhere). A client token, when
the proxy requires one, comes from ``--token`` or ``CREDPROXY_TOKEN``.
"""

from __future__ import annotations

import os
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

import orjson

from proxy.cli import table
from proxy.config import ADMIN_PREFIX, Config, load_config
from proxy.errors import ConfigError, CredproxyError
from proxy.storage.client_tokens import load_client_tokens
from proxy.storage.files import load_credentials
from proxy.storage.private_files import check_private

TOKEN_ENV = "CREDPROXY_TOKEN"  # noqa: S105 (the name of a variable)
DEFAULT_URL = "http://127.0.0.1:8787"


class ConsoleError(CredproxyError):
    """A command could not do its job; the message says what to do about it."""


def base_url(config: Config) -> str:
    """Where a proxy started with ``config`` answers on this machine."""
    host = config.listen.host
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{config.listen.port}"


def resolve_url(url: str | None, config_path: str | None) -> str:
    if url:
        return url.rstrip("/")
    if config_path:
        return base_url(load_config(config_path))
    return DEFAULT_URL


def token_from_config(config_path: str | None) -> str | None:
    """The first client token a config names (inline or in its token file), to talk to that proxy."""
    if not config_path:
        return None
    tokens = load_client_tokens(load_config(config_path).security)
    return tokens[0].reveal() if tokens else None


def get_json(base: str, path: str, token: str | None, query: Mapping[str, str] | None = None) -> Any:
    """GET ``base + /_credproxy + path`` and parse the JSON answer."""
    url = f"{base}{ADMIN_PREFIX}{path}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    if not url.startswith(("http://", "https://")):
        raise ConsoleError(f"{base} is not an http:// URL")
    request = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310 (http(s) only)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        raise ConsoleError(_http_problem(base, exc)) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConsoleError(
            f"cannot reach credproxy at {base} ({reason}); is `credproxy serve` running there? "
            "(--url or --config to point elsewhere)"
        ) from None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ConsoleError(f"{base} answered something that is not JSON; is it credproxy?") from None


def _http_problem(base: str, exc: urllib.error.HTTPError) -> str:
    if exc.code in (401, 403):
        return (
            f"credproxy at {base} refused the request ({exc.code}): it wants a client token; "
            f"pass --token or set {TOKEN_ENV}"
        )
    message = ""
    try:
        doc = orjson.loads(exc.read())
        message = doc["error"]["message"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        pass
    if exc.code == 404 and not message:
        return f"{base} has no {ADMIN_PREFIX} endpoints; is it credproxy (and a recent version)?"
    return f"credproxy at {base} answered {exc.code}: {message or exc.reason}"


# status --------------------------------------------------------------------------------------


def _short_time(epoch: float, now: float) -> str:
    """``15:04`` today, ``Sat 15:04`` within a week, else the full local date."""
    full = table.local_time(epoch)
    if full[:10] == table.local_time(now)[:10]:
        return full[11:]
    if 0 < epoch - now < 6 * 86400:
        return time.strftime("%a %H:%M", time.localtime(epoch))
    return full


def _window_name(window: Mapping[str, Any]) -> str:
    minutes = window.get("window_minutes")
    name = str(window.get("name", ""))
    family = name.rpartition(".")[0]
    if isinstance(minutes, int) and minutes > 0:
        span = f"{minutes // 1440}d" if minutes % 1440 == 0 else f"{minutes // 60}h" if minutes % 60 == 0 else ""
        if span:
            return f"{family} {span}" if family else span
    return name


def usage_text(usage: Mapping[str, Any] | None, now: float) -> str:
    """``5h 12% (resets 15:04), 7d 5% (resets Sun 01:15)``; windows that all reset in the same minute
    (an Anthropic key's four per-minute windows) name their reset once, at the end."""
    if not usage or not usage.get("windows"):
        return "-"
    windows = usage["windows"]
    resets = [_short_time(w["resets_at"], now) if w.get("resets_at") else None for w in windows]
    shared = resets[0] if len(windows) > 1 and resets[0] is not None and len(set(resets)) == 1 else None
    parts = []
    for window, reset in zip(windows, resets, strict=True):
        text = f"{_window_name(window)} {window['used_percent']:g}%"
        if reset is not None and shared is None:
            text += f" (resets {reset})"
        parts.append(text)
    return ", ".join(parts) + (f" (all reset {shared})" if shared is not None else "")


def state_text(cred: Mapping[str, Any], now: float) -> str:
    state = cred["state"]
    reason = cred.get("reason")
    if state == "blocked":
        until = cred["blocked_until"]
        text = f"blocked until {_short_time(until, now)}, in {table.duration(until - now)}"
        return f"{text} ({reason})" if reason else text
    if state == "needs_relogin":
        return "needs re-login"
    if state == "disabled":
        return f"disabled ({reason})" if reason else "disabled"
    return "ok, needs attention" if cred.get("attention") else "ok"


def render_status(doc: Mapping[str, Any], url: str) -> str:
    now = float(doc["now"])
    out = [f"credproxy {doc.get('version', '?')} at {url}, {table.local_time(now)}"]
    for provider in doc["providers"]:
        out.append("")
        out.append(
            f"{provider['name']}  {provider['mount']} -> {provider['upstream']}  (selector: {provider['selector']})"
        )
        rows = [
            [
                cred["label"],
                cred["kind"],
                state_text(cred, now),
                usage_text(cred.get("usage"), now),
                str(cred["served"]),
                cred.get("last_error") or "-",
            ]
            for cred in provider["credentials"]
        ]
        if rows:
            out.append(
                table.render(["credential", "kind", "state", "usage", "served", "last error"], rows, indent="  ")
            )
        else:
            out.append("  (no credentials: every request gets 503)")
        sockets = ((doc.get("websockets") or {}).get("providers") or {}).get(provider["name"])
        if sockets:
            on = ", ".join(f"{label}: {n}" for label, n in sorted(sockets["by_credential"].items()))
            out.append(f"  websockets: {sockets['open']} open ({on})")
    for problem in doc.get("degraded") or []:
        out.append(f"\nwarning: {problem['what']}: {problem['detail']}")
    return "\n".join(out)


def render_which(doc: Mapping[str, Any]) -> str:
    session = doc.get("session")
    who = f"session {session!r} (hash {doc['session_hash']})" if session else "a request without a session id"
    lines = [f"{who} on provider {doc['provider']} (selector: {doc['selector']}):"]
    rows = []
    for i, cred in enumerate(doc["order"], 1):
        mark = "<- serves it now" if cred["label"] == doc.get("serving") else ""
        rows.append([str(i), cred["label"], cred["kind"], cred["state"], mark])
    lines.append(table.render(["#", "credential", "kind", "state", ""], rows, indent="  "))
    if doc.get("serving") is None:
        lines.append("no credential can serve it now (every one is blocked or disabled)")
    if doc.get("last_served"):
        lines.append(f"last served by {doc['last_served']}")
    return "\n".join(lines)


def which_everywhere(base: str, token: str | None, session: str | None) -> tuple[list[Any], list[str]]:
    """``which`` on every provider of the proxy at ``base`` that has credentials; also the names of
    those that have none."""
    status = get_json(base, "/status", token)
    names = [p["name"] for p in status["providers"] if p["credentials"]]
    empty = [p["name"] for p in status["providers"] if not p["credentials"]]
    docs = [get_json(base, "/which", token, {"session": session or "", "provider": name}) for name in names]
    return docs, empty


def render_which_all(docs: list[Any], empty: list[str]) -> str:
    """:func:`render_which` of each provider; a provider without credentials gets a line."""
    parts = [render_which(doc) for doc in docs]
    parts.extend(f"provider {name}: no credentials (every request gets 503)" for name in empty)
    if len(docs) > 1:
        parts.append("(--provider NAME shows one provider)")
    return "\n\n".join(parts)


# check ---------------------------------------------------------------------------------------


def check(config_path: str) -> tuple[bool, str]:
    """Validate the config and its credentials file; returns (no problems, the report)."""
    lines: list[str] = []
    problems: list[str] = []
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        return False, f"problem: {exc}"
    lines.append(f"config {config.path}: valid")
    lines.append(f"listens on {base_url(config)} (listen.host {config.listen.host})")
    path = config.credentials_file
    try:
        creds = load_credentials(path, [p.name for p in config.providers], config.kinds)
    except CredproxyError as exc:
        lines.append(f"problem: {exc}")
        return False, "\n".join(lines)
    mode = stat.S_IMODE(os.stat(path).st_mode)
    lines.append(f"credentials {path} (mode {mode:04o})")
    # The same start-up checks `serve` makes: a file `check` passes, `serve` accepts.
    try:
        check_private(path, "credentials file")
    except ConfigError as exc:
        problems.append(str(exc))
    try:
        tokens = load_client_tokens(config.security)
        where = f" ({config.security.client_token_file})" if config.security.client_token_file else ""
        lines.append(f"client tokens: {len(tokens)} required{where}" if tokens else "client tokens: off (loopback)")
    except ConfigError as exc:
        problems.append(str(exc))
    for provider in config.providers:
        lines.append("")
        lines.append(
            f"provider {provider.name}: {provider.mount} -> {provider.upstream} "
            f"(kind {provider.kind}, selector {provider.selector})"
        )
        mine = creds.get(provider.name, ())
        if not mine:
            problems.append(
                f"provider {provider.name} has no credentials in {path} (add a {provider.name!r} entry); "
                "it would answer 503 to everything"
            )
            continue
        rows = []
        for cred in mine:
            note = ""
            if cred.expires_ms is not None:
                note = f"access token expires {table.local_time(cred.expires_ms / 1000)} (refreshed automatically)"
            rows.append([cred.label, cred.kind, note])
        lines.append(table.render(["credential", "kind", "notes"], rows, indent="  "))
    lines.append("")
    for problem in problems:
        lines.append(f"problem: {problem}")
    if not problems:
        lines.append("ok: `credproxy serve --config " + str(config_path) + "` would serve the above")
    return not problems, "\n".join(lines)


def read_token(value: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    return value or environ.get(TOKEN_ENV) or None
