"""``credproxy status``, ``which`` and ``check`` as a user runs them, and their pure rendering."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from proxy.cli import main as cli
from proxy.cli import table
from proxy.cli.console import render_which, state_text, usage_text
from proxy.core.clock import ManualClock
from proxy.core.selection import fnv1a_utf16
from proxy.testing.fake_upstream import FakeUpstream, usage_limit
from tests.conftest import ProxyFactory, keys, run_credproxy, write_json

ROOT = Path(__file__).resolve().parents[2]
KEYS = ("sk-console-alpha-01", "sk-console-bravo-02")


credproxy = run_credproxy


async def test_status_prints_a_table_per_provider_and_json_for_scripts(
    proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock
) -> None:
    sid = "s"
    first = fnv1a_utf16(sid) % 2
    fake.on(usage_limit(resets_in=5400), token=KEYS[first], times=1)
    p = await proxy(keys(*KEYS))
    async with p.post("/openai/responses", json={"model": "m"}, headers={"session-id": sid}) as r:
        assert r.status == 200

    code, out, err = await credproxy("status", "--url", p.url)
    assert code == 0, err
    assert f"openai  /openai -> http://127.0.0.1:{fake.port}/v1  (selector: hashed)" in out
    assert "openai-codex" in out
    assert "(no credentials: every request gets 503)" in out
    until = table.local_time(clock.time() + 5400)[11:]
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  openai#")}
    assert f"blocked until {until}, in 1h30m (usage_limit_reached)" in rows[f"openai#{first + 1}"]
    assert rows[f"openai#{2 - first}"].split()[1:3] == ["api_key", "ok"]
    for secret in KEYS:
        assert secret not in out

    code, out, _ = await credproxy("status", "--url", p.url, "--json")
    assert code == 0
    doc = orjson.loads(out)
    assert [c["state"] for c in doc["providers"][0]["credentials"]] == (
        ["blocked", "ok"] if first == 0 else ["ok", "blocked"]
    )


async def test_status_and_which_find_the_proxy_through_its_config(proxy: ProxyFactory, tmp_path: Path) -> None:
    """Through the config: its listen address (0.0.0.0 is reached on 127.0.0.1) and its client token."""
    token = "cpx_" + "t" * 40
    (tmp_path / "client-token").write_text(token + "\n")
    (tmp_path / "client-token").chmod(0o600)
    p = await proxy(keys(*KEYS), security={"client_token_file": "client-token"})
    port = int(p.url.rsplit(":", 1)[1])
    doc = orjson.loads(p.config_path.read_bytes())
    config = write_json(tmp_path / "running.json", {**doc, "listen": {"host": "0.0.0.0", "port": port}})

    code, out, err = await credproxy("which", "--config", str(config), "--session", "my-session")
    assert code == 0, err
    first = fnv1a_utf16("my-session") % 2
    lines = out.splitlines()
    assert (
        lines[0]
        == f"session 'my-session' (hash {fnv1a_utf16('my-session'):08x}) on provider openai (selector: hashed):"
    )
    assert lines[2].split() == ["1", f"openai#{first + 1}", "api_key", "ok", "<-", "serves", "it", "now"]
    assert lines[3].split() == ["2", f"openai#{2 - first}", "api_key", "ok"]
    code, out, _ = await credproxy("status", "--config", str(config))
    assert code == 0
    assert f"at http://127.0.0.1:{port}," in out


async def test_which_without_a_provider_shows_every_provider_and_names_the_flag(proxy: ProxyFactory) -> None:
    """Two providers with credentials: no error about a query parameter, the order in each of them."""
    account = {"type": "oauth", "label": "acct", "access": "at-console-0001", "refresh": "rt-console-0001"}
    p = await proxy({**keys(*KEYS), "openai-codex": [{**account, "accountId": "acct-1"}]})
    code, out, err = await credproxy("which", "--url", p.url, "--session", "my-session")
    assert code == 0, err
    assert "provider=" not in out + err
    first = fnv1a_utf16("my-session") % 2
    blocks = out.split("\n\n")
    assert blocks[0].splitlines()[0].endswith("on provider openai (selector: hashed):")
    assert blocks[0].splitlines()[2].split()[:2] == ["1", f"openai#{first + 1}"]
    assert blocks[1].splitlines()[0].endswith("on provider openai-codex (selector: hashed):")
    assert blocks[1].splitlines()[2].split()[:2] == ["1", "acct"]
    assert blocks[2] == "(--provider NAME shows one provider)\n"

    code, out, _ = await credproxy("which", "--url", p.url, "--session", "my-session", "--json")
    assert code == 0
    assert [doc["provider"] for doc in orjson.loads(out)] == ["openai", "openai-codex"]
    code, out, _ = await credproxy("which", "--url", p.url, "--session", "my-session", "--provider", "openai-codex")
    assert code == 0
    assert "on provider openai-codex" in out
    assert "on provider openai " not in out


def test_an_unreachable_proxy_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["status", "--url", "http://127.0.0.1:9"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "cannot reach credproxy at http://127.0.0.1:9" in err


async def test_the_client_token_is_sent_from_the_flag_or_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[str | None] = []

    async def status(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        if request.headers.get("Authorization") != "Bearer tok-123":
            return web.json_response({"error": {"message": "client token required"}}, status=401)
        return web.json_response({"version": "x", "now": time.time(), "providers": []})

    app = web.Application()
    app.router.add_get("/_credproxy/status", status)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    url = f"http://127.0.0.1:{port}"
    try:
        monkeypatch.delenv("CREDPROXY_TOKEN", raising=False)
        # In a thread: the command blocks, and this event loop must keep serving it.
        assert await asyncio.to_thread(cli.main, ["status", "--url", url, "--token", "tok-123"]) == 0
        monkeypatch.setenv("CREDPROXY_TOKEN", "tok-123")
        assert await asyncio.to_thread(cli.main, ["status", "--url", url]) == 0
        monkeypatch.delenv("CREDPROXY_TOKEN")
        assert await asyncio.to_thread(cli.main, ["status", "--url", url]) == 2
        assert "pass --token or set CREDPROXY_TOKEN" in capsys.readouterr().err
    finally:
        await runner.cleanup()
    assert seen == ["Bearer tok-123", "Bearer tok-123", None]


def _check_files(tmp_path: Path, fake_port: int, creds: Any, mode: int = 0o600) -> Path:
    auth = write_json(tmp_path / "auth.json", creds)
    os.chmod(auth, mode)
    providers = {"openai": {"mount": "/openai", "upstream": f"http://127.0.0.1:{fake_port}/v1"}}
    return write_json(tmp_path / "config.json", {"credentials_file": "auth.json", "providers": providers})


async def test_check_prints_what_would_be_served_without_tokens(tmp_path: Path) -> None:
    account = {"type": "oauth", "label": "work", "access": "at-check-1", "refresh": "rt-check-1", "expires": 1}
    config = _check_files(tmp_path, 1234, {"openai": [*keys(KEYS[0])["openai"], account]})
    code, out, err = await credproxy("check", "--config", str(config))
    assert code == 0, err
    assert "provider openai: /openai -> http://127.0.0.1:1234/v1 (kind openai, selector hashed)" in out
    assert "openai#1    api_key" in out
    assert "work        oauth    access token expires" in out
    assert out.rstrip().endswith("would serve the above")
    for secret in (KEYS[0], "at-check-1", "rt-check-1"):
        assert secret not in out + err


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no credentials", "provider openai has no credentials"),
        ("world readable", "accessible by group or others (mode 0644); it holds secrets: fix: chmod 600"),
        ("missing file", "the credentials file does not exist"),
        ("bad config", "at providers.openai.upstream: must be an absolute http(s) URL"),
        ("bad key", "at openai[0].key: contains whitespace"),
        ("missing token file", "the client token file does not exist"),
    ],
)
def test_check_fails_with_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, message: str
) -> None:
    creds: Any = keys(KEYS[0])
    mode = 0o600
    if case == "no credentials":
        creds = {"other": []}
    if case == "bad key":
        creds = keys("sk-with space-secret")
    if case == "world readable":
        mode = 0o644
    config = _check_files(tmp_path, 1234, creds, mode)
    if case == "missing file":
        (tmp_path / "auth.json").unlink()
    if case == "bad config":
        write_json(config, {"providers": {"openai": {"mount": "/openai", "upstream": "ftp://x"}}})
    if case == "missing token file":  # `serve` would refuse to start: `check` must not say "ok"
        doc = orjson.loads(config.read_bytes())
        write_json(config, {**doc, "security": {"client_token_file": "client-token"}})
    assert cli.main(["check", "--config", str(config)]) == 1
    out, err = capsys.readouterr()
    assert message in err
    assert "sk-with space-secret" not in out + err


NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("cred", "expected"),
    [
        ({"state": "ok"}, "ok"),
        ({"state": "ok", "attention": True}, "ok, needs attention"),
        ({"state": "disabled", "reason": "invalid_api_key"}, "disabled (invalid_api_key)"),
        ({"state": "needs_relogin", "reason": "needs_relogin"}, "needs re-login"),
        (
            {"state": "blocked", "blocked_until": NOW + 300, "reason": "rate_limit_exceeded"},
            f"blocked until {table.local_time(NOW + 300)[11:]}, in 5m (rate_limit_exceeded)",
        ),
        (
            {"state": "blocked", "blocked_until": NOW + 30 * 86400, "reason": "usage_limit_reached"},
            f"blocked until {table.local_time(NOW + 30 * 86400)}, in 30d00h (usage_limit_reached)",
        ),
    ],
)
def test_state_text(cred: dict[str, Any], expected: str) -> None:
    assert state_text(cred, NOW) == expected


def test_usage_text_names_windows_by_length() -> None:
    usage = {
        "windows": [
            {"name": "primary", "used_percent": 12.5, "window_minutes": 300, "resets_at": NOW + 60},
            {"name": "secondary", "used_percent": 5, "window_minutes": 10080, "resets_at": None},
            {"name": "gpt-5.primary", "used_percent": 1, "window_minutes": 300, "resets_at": None},
            {"name": "odd", "used_percent": 1, "window_minutes": 7, "resets_at": None},
        ]
    }
    assert usage_text(usage, NOW) == (
        f"5h 12.5% (resets {table.local_time(NOW + 60)[11:]}), 7d 5%, gpt-5 5h 1%, odd 1%"
    )
    assert usage_text(None, NOW) == "-"


def test_usage_text_of_an_anthropic_key_names_a_shared_reset_once() -> None:
    reset = NOW + 45
    usage = {
        "windows": [
            {"name": "requests", "used_percent": 2.0, "window_minutes": None, "resets_at": reset},
            {"name": "tokens", "used_percent": 100.0, "window_minutes": None, "resets_at": reset},
            {"name": "input-tokens", "used_percent": 0.01, "window_minutes": None, "resets_at": reset},
            {"name": "output-tokens", "used_percent": 0.03, "window_minutes": None, "resets_at": reset},
        ]
    }
    at = table.local_time(reset)[11:]
    assert usage_text(usage, NOW) == (
        f"requests 2%, tokens 100%, input-tokens 0.01%, output-tokens 0.03% (all reset {at})"
    )
    usage["windows"][3]["resets_at"] = None
    assert usage_text(usage, NOW).endswith(f"input-tokens 0.01% (resets {at}), output-tokens 0.03%")


def test_which_says_when_nothing_can_serve() -> None:
    doc = {
        "provider": "openai",
        "session": None,
        "session_hash": None,
        "selector": "rendezvous",
        "order": [{"label": "a", "kind": "api_key", "state": "blocked"}],
        "serving": None,
        "last_served": None,
    }
    text = render_which(doc)
    assert text.startswith("a request without a session id on provider openai (selector: rendezvous):")
    assert "no credential can serve it now" in text


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0s"), (59.4, "59s"), (60, "1m"), (3599, "59m"), (3660, "1h01m"), (90000, "1d01h")]
)
def test_duration(seconds: float, text: str) -> None:
    assert table.duration(seconds) == text


def test_render_pads_columns_and_strips_trailing_space() -> None:
    assert table.render(["a", "bb", "c"], [["xxx", "y", ""]]) == "a    bb  c\nxxx  y"
