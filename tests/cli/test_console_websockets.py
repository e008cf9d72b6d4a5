"""``credproxy status`` shows the open WebSockets of a provider, by the credential each is on."""

from __future__ import annotations

from proxy.cli.console import render_status

DOC = {
    "version": "0.1.0",
    "now": 1_800_000_000.0,
    "providers": [
        {"name": "openai-codex", "mount": "/codex", "upstream": "https://x", "selector": "hashed", "credentials": []},
        {"name": "openai", "mount": "/openai", "upstream": "https://y", "selector": "hashed", "credentials": []},
    ],
    "websockets": {
        "open": 3,
        "cap": 100,
        "opened": 9,
        "providers": {"openai-codex": {"open": 3, "by_credential": {"work": 2, "home": 1}}},
    },
}


def test_open_websockets_are_shown_under_their_provider() -> None:
    lines = render_status(DOC, "http://127.0.0.1:8787").splitlines()
    at = lines.index("  websockets: 3 open (home: 1, work: 2)")
    assert lines[at - 2].startswith("openai-codex ")
    assert sum("websockets" in line for line in lines) == 1  # none for a provider without sockets
