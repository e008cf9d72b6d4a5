"""The ``credproxy`` command as a user runs it: a real process, a real port, the fake upstream."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.config import load_config
from proxy.testing.fake_upstream import FakeUpstream, sse
from tests.conftest import ROOT, default_providers, keys, run_credproxy, start_serve, stop_serve, write_json

CANARY = "sk-canary-3f9c2a7b1e"


async def test_serve_proxies_logs_one_line_per_request_and_stops_on_sigterm(tmp_path: Path, fake: FakeUpstream) -> None:
    write_json(tmp_path / "auth.json", keys(CANARY))
    config = write_json(
        tmp_path / "config.json", {"credentials_file": "auth.json", "providers": default_providers(fake)}
    )
    serving = await start_serve(config)
    url = serving.url
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{url}/openai/responses", json={"model": "m"}, headers={"X-Session-Id": "s1"}
            ) as r:
                assert r.status == 200
                assert r.headers["x-credproxy-credential"] == "openai#1"
            # A malformed request whose overlong header starts with a secret.
            reader, writer = await asyncio.open_connection(*url.removeprefix("http://").split(":"))
            writer.write(
                b"GET /openai/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                + CANARY.encode() * 1000
                + b"\r\n\r\n"
            )
            await writer.drain()
            assert b" 400 " in await asyncio.wait_for(reader.read(1000), 10)
            writer.close()
    finally:
        code, log = await stop_serve(serving)
    assert code == 0
    assert fake.tokens() == [CANARY]
    assert re.search(r"openai POST /openai/responses -> 200 served session=[0-9a-f]{8} credential=openai#1", log), log
    assert re.search(r"refused a malformed request: (LineTooLong|a header is longer)", log), log
    assert CANARY not in log
    assert "Traceback" not in log


async def test_serve_warns_at_start_about_a_provider_without_credentials(tmp_path: Path, fake: FakeUpstream) -> None:
    """As `credproxy check` does: openai-codex is configured but the file holds only an API key."""
    write_json(tmp_path / "auth.json", keys(CANARY))
    config = write_json(
        tmp_path / "config.json", {"credentials_file": "auth.json", "providers": default_providers(fake)}
    )
    serving = await start_serve(config)
    code, log = await stop_serve(serving)
    assert code == 0
    warnings = [line for line in log.splitlines() if " WARNING " in line]
    assert len(warnings) == 1, log
    assert warnings[0].endswith(
        f"provider openai-codex has no credentials in {tmp_path / 'auth.json'}: it answers 503 to every request "
        "until some are added (the file is re-read when it changes)"
    )
    assert fake.records == []


@pytest.mark.parametrize(("chosen", "expected"), [(None, "malloc"), ("pymalloc", "pymalloc")])
async def test_serve_runs_on_the_system_allocator_unless_one_is_chosen(
    tmp_path: Path, fake: FakeUpstream, chosen: str | None, expected: str
) -> None:
    """``credproxy serve`` re-executes itself with PYTHONMALLOC=malloc (see proxy/edge/memory.py): same PID."""
    write_json(tmp_path / "auth.json", keys("sk-test-alpha-0001"))
    config = write_json(
        tmp_path / "config.json", {"credentials_file": "auth.json", "providers": default_providers(fake)}
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONMALLOC"}
    if chosen is not None:
        env["PYTHONMALLOC"] = chosen
    serving = await start_serve(config, env=env)
    try:
        environ = (await asyncio.to_thread(Path(f"/proc/{serving.process.pid}/environ").read_bytes)).split(b"\0")
        async with aiohttp.ClientSession() as session, session.post(f"{serving.url}/openai/responses", json={}) as r:
            assert r.status == 200
    finally:
        code, log = await stop_serve(serving)
    assert f"PYTHONMALLOC={expected}".encode() in environ
    assert code == 0
    assert log.count("listening on") == 1


@pytest.mark.parametrize(
    ("doc", "key"),
    [
        ({"providers": {"openai": {"mount": "/openai", "upstream": "ftp://x"}}}, "providers.openai.upstream"),
        (
            {"providers": {"openai": {"mount": "/openai", "upstream": "https://a.example", "colour": 1}}},
            "providers.openai.colour",
        ),
        ({"listen": {"port": "8787"}, "providers": {}}, "listen.port"),
    ],
)
async def test_a_bad_config_refuses_to_start_naming_file_and_key(tmp_path: Path, doc: dict[str, Any], key: str) -> None:
    config = write_json(tmp_path / "config.json", doc)
    before = config.read_bytes()
    code, _, err = await run_credproxy("serve", "--config", str(config))
    assert code == 2
    assert f"{config} at {key}:" in err
    assert config.read_bytes() == before


async def test_a_corrupt_credentials_file_refuses_to_start_without_printing_it(
    tmp_path: Path, fake: FakeUpstream
) -> None:
    auth = tmp_path / "auth.json"
    auth.write_bytes(b'{"openai": [{"type": "api_key", "key": "' + CANARY.encode() + b'"}')
    os.chmod(auth, 0o600)
    before = auth.read_bytes()
    config = write_json(
        tmp_path / "config.json", {"credentials_file": "auth.json", "providers": default_providers(fake)}
    )
    code, _, err = await run_credproxy("serve", "--config", str(config))
    assert code == 2
    assert str(auth) in err
    assert "line 1, column" in err
    assert CANARY not in err
    assert auth.read_bytes() == before


def test_the_example_config_is_valid() -> None:
    config = load_config(ROOT / "config.example.json")
    assert [(p.name, p.kind) for p in config.providers] == [
        ("openai", "openai"),
        ("openai-codex", "codex"),
        ("anthropic", "anthropic"),
    ]
    assert config.listen.host == "127.0.0.1"


@pytest.mark.parametrize("server", ["fast", "aiohttp"])
@pytest.mark.parametrize(("grace", "finishes"), [(10.0, True), (0.3, False)])
async def test_sigterm_lets_streams_finish_within_the_grace_period(
    tmp_path: Path, fake: FakeUpstream, grace: float, finishes: bool, server: str
) -> None:
    """F36: stop accepting, let streams finish up to the grace period, then cut them visibly; on both
    servers (one connection table shuts them down)."""
    gate = asyncio.Event()
    fake.on(sse([{"type": "response.created"}, {"type": "response.completed"}], gates=[gate]))
    write_json(tmp_path / "auth.json", keys(CANARY))
    doc = {
        "credentials_file": "auth.json",
        "providers": default_providers(fake),
        "limits": {"shutdown_grace": grace},
        "server": server,
    }
    serving = await start_serve(write_json(tmp_path / "config.json", doc))
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{serving.url}/openai/responses", json={"stream": True}) as r:
            assert b"response.created" in await r.content.readuntil(b"\n\n")
            serving.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)  # give the signal time to land; the stream is still open
            if finishes:
                gate.set()
                assert b"response.completed" in await r.read()
            else:
                with pytest.raises(aiohttp.ClientPayloadError):
                    await r.read()
        with pytest.raises(aiohttp.ClientConnectionError):
            async with session.get(f"{serving.url}/_credproxy/health") as again:
                await again.read()
    assert await asyncio.wait_for(serving.process.wait(), 30) == 0
