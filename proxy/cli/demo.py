"""``credproxy demo``: see what credproxy does in a few seconds, with nothing of yours.

Everything is the real thing except the upstream and the clock: the proxy application is the one
``credproxy serve`` runs, loaded from a config file and a credentials file (three made-up ChatGPT
accounts, mode 0600) in a temporary folder, listening on a free port of 127.0.0.1. The upstream is
:class:`~proxy.testing.fake_upstream.FakeUpstream` on another free loopback port, and both share a
:class:`DemoClock`, so "an hour passes" is one call, and the run is deterministic. The scenario plays
the hour before the demo started (its clock starts an hour ago), so that when it ends the simulated
time is now; from then on (``--keep-running``) the clock is the real one, and every reset time a
client sees (``resets_at``, ``Retry-After``, status) agrees with the ``Date`` header and the wall clock.

The scenario sends real HTTP requests through the proxy. Each row of the table is built from what
happened: the tokens the fake upstream received (mapped to their labels) and what it answered, and
the status and ``x-credproxy-*`` / ``Retry-After`` headers the client got. If a step does not turn
out as the scenario expects, the demo says so and exits 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import orjson
from aiohttp import web

from proxy.app import POOL, known_secrets, make_app, start
from proxy.cli import table
from proxy.cli.console import render_status
from proxy.config import Logging, load_config
from proxy.core.clock import ManualClock
from proxy.edge.server import Server
from proxy.observe import logs
from proxy.testing.fake_upstream import FakeUpstream, Recorded, Responder, ok, usage_limit

LABELS = ("alpha", "bravo", "charlie")
#: Simulated seconds the scenario covers: its clock starts this long before the demo does.
SCENARIO_SPAN = 3600
PROVIDER = "openai-codex"
MOUNT = "/codex"
BODY = {"model": "gpt-5.1-codex", "input": "say hi", "stream": True}


class DemoClock(ManualClock):
    """A :class:`ManualClock` that becomes the real clock when told (:meth:`follow_real_time`)."""

    __slots__ = ("_real_since",)

    def __init__(self, start: float) -> None:
        super().__init__(start)
        self._real_since: tuple[float, float] | None = None  # (time.monotonic(), our monotonic) then

    def follow_real_time(self) -> None:
        self._real_since = (time.monotonic(), super().monotonic())

    def time(self) -> float:
        return time.time() if self._real_since is not None else super().time()

    def monotonic(self) -> float:
        if self._real_since is None:
            return super().monotonic()
        real, ours = self._real_since
        return ours + time.monotonic() - real


@dataclass
class Row:
    clock: str
    session: str
    setup: str
    tried: str
    outcome: str
    problem: str = ""


@dataclass
class Demo:
    folder: Path
    clock: DemoClock
    fake: FakeUpstream
    tokens: dict[str, str] = field(default_factory=dict)  # token -> label
    answers: list[int] = field(default_factory=list)
    answered: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""
    app: web.Application | None = None
    runner: Server | None = None
    client: aiohttp.ClientSession | None = None
    started_at: float = 0.0
    snapshot: dict[str, Any] = field(default_factory=dict)

    async def start(self) -> None:
        await self.fake.start()
        base = f"http://127.0.0.1:{self.fake.port}"
        creds = []
        expires_ms = int((self.clock.time() + 30 * 86400) * 1000)
        for label in LABELS:
            token = f"demo-access-{label}-{os.urandom(4).hex()}"
            self.tokens[token] = label
            creds.append(
                {
                    "type": "oauth",
                    "label": label,
                    "access": token,
                    "refresh": f"demo-refresh-{label}-{os.urandom(4).hex()}",
                    "expires": expires_ms,
                    "accountId": f"demo-account-{label}",
                }
            )
        _write(self.folder / "auth.json", {PROVIDER: creds})
        config = {
            "listen": {"host": "127.0.0.1", "port": 0},
            "credentials_file": "auth.json",
            "providers": {
                PROVIDER: {
                    "mount": MOUNT,
                    "upstream": f"{base}/backend-api/codex",
                    # Never used in the demo (tokens do not expire); pointed at the fake all the same.
                    "token_url": f"{base}/oauth/token",
                }
            },
        }
        self.app = make_app(load_config(_write(self.folder / "config.json", config)), clock=self.clock)
        logs.configure(Logging(level="warning"), known=known_secrets(self.app))
        self.runner, port = await start(self.app, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{port}"
        self.client = aiohttp.ClientSession(trust_env=False)
        self.started_at = self.clock.time()
        self.script()

    async def status(self) -> dict[str, Any]:
        """The proxy's answer to ``GET /_credproxy/status``."""
        assert self.client is not None
        async with self.client.get(f"{self.url}/_credproxy/status") as response:
            doc: dict[str, Any] = orjson.loads(await response.read())
            return doc

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.close()
        if self.runner is not None:
            await self.runner.cleanup()
        await self.fake.stop()

    def script(self, *rules: tuple[Responder, str | None]) -> None:
        """From now on the fake upstream answers with ``rules`` (responder, label or None), else success."""
        self.fake.reset_rules()
        token_of = {label: token for token, label in self.tokens.items()}
        for responder, label in rules:
            self.fake.on(self._noted(responder), token=token_of[label] if label else None)
        self.fake.on(self._noted(ok()))

    def _noted(self, responder: Responder) -> Responder:
        async def respond(request: web.Request, recorded: Recorded, fake: FakeUpstream) -> web.StreamResponse:
            response = await responder(request, recorded, fake)
            self.answers.append(response.status)
            self.answered.set()
            return response

        return respond

    async def send(self, session: str, setup: str, expect: tuple[int, str | None]) -> Row:
        """One client request; the row says what the upstream saw and what the client got."""
        assert self.client is not None
        first = len(self.fake.records)
        async with self.client.post(f"{self.url}{MOUNT}/responses", json=BODY, headers={"session-id": session}) as r:
            await r.read()
            status, served = r.status, r.headers.get("x-credproxy-credential")
            attempts, retry_after = r.headers.get("x-credproxy-attempts", "?"), r.headers.get("Retry-After")
        records = self.fake.records[first:]
        while len(self.answers) < len(self.fake.records):  # the last answer is noted just after it is sent
            self.answered.clear()
            await asyncio.wait_for(self.answered.wait(), 10)
        answers = self.answers[first : first + len(records)]
        tried = " -> ".join(
            f"{self.tokens.get(rec.token or '', 'unknown')} {code}" for rec, code in zip(records, answers, strict=True)
        )
        if status < 400:
            outcome = f"{status} from {served}" + (f" ({attempts} attempts)" if attempts != "1" else "")
        else:
            outcome = f"{status}, Retry-After: {retry_after} s" if retry_after else str(status)
        problem = ""
        if (status, served) != expect:
            problem = f"expected {expect[0]}" + (f" from {expect[1]}" if expect[1] else "")
        offset = table.clock_offset(self.clock.time() - self.started_at)
        return Row(offset, session, setup, tried or "(none)", outcome, problem)


async def scenario(demo: Demo) -> list[Row]:
    """Two sessions stick; a limit is replayed away; everything blocked is a 429; a reset brings one back."""
    rows = [
        await demo.send("blue", "", (200, "alpha")),
        await demo.send("green", "", (200, "bravo")),
        await demo.send("blue", "", (200, "alpha")),
    ]
    demo.script((usage_limit(resets_in=3600), "alpha"))
    rows.append(await demo.send("blue", "alpha hits its usage limit (resets in 1 h)", (200, "bravo")))
    demo.script()
    rows.append(await demo.send("blue", "", (200, "bravo")))
    demo.script(*((usage_limit(resets_in=1800), label) for label in LABELS))
    rows.append(await demo.send("green", "every account at its limit (resets in 30 min)", (429, None)))
    demo.snapshot = await demo.status()
    demo.script()
    demo.clock.advance(1800)
    rows.append(await demo.send("green", "clock moves 30 min: bravo's reset passes", (200, "bravo")))
    demo.clock.advance(1800)
    rows.append(await demo.send("blue", "clock moves 30 min: alpha's reset passes", (200, "alpha")))
    return rows


def render_rows(rows: list[Row]) -> str:
    header = ["request", "time", "session", "set-up", "credentials tried (upstream answer)", "outcome (client got)"]
    cells = [[str(i), r.clock, r.session, r.setup or "-", r.tried, r.outcome] for i, r in enumerate(rows, 1)]
    return table.render(header, cells)


async def run(out: TextIO, keep_running: bool = False) -> int:
    with tempfile.TemporaryDirectory(prefix="credproxy-demo-") as folder:
        clock = DemoClock(start=float(int(time.time()) - SCENARIO_SPAN))
        demo = Demo(Path(folder), clock, FakeUpstream(clock=clock))
        try:
            await demo.start()
            print(
                f"credproxy demo: credproxy on {demo.url} in front of a fake ChatGPT backend on "
                f"http://127.0.0.1:{demo.fake.port}\nwith three made-up accounts ({', '.join(LABELS)}). The clock "
                "is simulated: the scenario plays the hour\nbefore now in about a second.\n",
                file=out,
            )
            rows = await scenario(demo)
            print(render_rows(rows), file=out)
            print("\nWhat `credproxy status` showed after request 6 (at +0:00:00, simulated: an hour ago):\n", file=out)
            print(render_status(demo.snapshot, demo.url), file=out)
            problems = [f"request {i}: {r.problem}" for i, r in enumerate(rows, 1) if r.problem]
            for problem in problems:
                print(f"\nunexpected: {problem}", file=out)
            if keep_running and not problems:
                await _keep_running(demo, out)
            return 1 if problems else 0
        finally:
            await demo.stop()


async def _keep_running(demo: Demo, out: TextIO) -> None:
    def limited(recorded: Recorded) -> bool:
        """``x-demo-limit: alpha,bravo``: those credentials answer usage_limit_reached."""
        labels = (recorded.header("x-demo-limit") or "").replace(" ", "").split(",")
        return demo.tokens.get(recorded.token or "") in labels

    demo.clock.follow_real_time()
    demo.fake.reset_rules()
    demo.fake.on(usage_limit(resets_in=600), when=limited)
    assert demo.app is not None
    logs.configure(Logging(level="info"), known=known_secrets(demo.app))
    u = demo.url
    first = demo.app[POOL].order(PROVIDER, "my-session", advance=False)[0].label
    body = orjson.dumps(BODY).decode()
    print(
        f"""
Both stay up until Ctrl-C, on the real clock now (x-demo-limit blocks an account for 10 minutes, or until
you lift it). Try:

  curl -sS {u}{MOUNT}/responses -H 'session-id: my-session' -H 'content-type: application/json' -d '{body}' -D -
  curl -sS {u}{MOUNT}/responses -H 'session-id: my-session' -H 'x-demo-limit: {first}' \\
       -H 'content-type: application/json' -d '{body}' -D -   # {first} answers usage_limit_reached
  credproxy status --url {u}
  credproxy which --url {u} --session my-session
  curl -sS -X POST {u}/_credproxy/credentials/alpha/unblock
  curl -sS {u}/_credproxy/status
  curl -sS {u}/_credproxy/metrics
""",
        file=out,
        flush=True,
    )
    await _wait_for_signal()


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    await stop.wait()


def _write(path: Path, doc: Any) -> Path:
    path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    os.chmod(path, 0o600)
    return path


def main(keep_running: bool = False) -> int:
    return asyncio.run(run(sys.stdout, keep_running))
