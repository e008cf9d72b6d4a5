"""Every default of ``proxy/config.py`` is the one README's config table and ``config.example.json`` show.

The defaults are read through the real parsing path (a minimal config, everything else left out), so a
changed literal in a dataclass or in a ``Section`` call is caught, and so is a documented key that no
longer exists or a new key that nobody documented.
"""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.config import Config, Provider, parse_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config.json"
#: Keys whose value in config.example.json is deliberately not the default, and why.
EXAMPLE_SHOWS_A_CHOICE = {
    "security.client_token_file": "the example turns client tokens on",
    "state.url": "the example names the Redis URL to edit (backend stays file)",
    "providers.openai-codex.soft_limit_percent": "the example shows the soft limit turned on",
}


def minimal() -> Config:
    return parse_config(
        CONFIG, {"providers": {"openai": {"mount": "/openai", "upstream": "https://api.openai.com/v1"}}}
    )


def defaults() -> dict[str, Any]:
    """Every top-level and section key with its default, as parsing a minimal config gives it."""
    config = minimal()
    found: dict[str, Any] = {
        "credentials_file": config.credentials_file.name,
        "transport": config.transport,
        "server": config.server,
    }
    for section in ("listen", "limits", "logging", "security", "state"):
        value = getattr(config, section)
        for field in fields(value):
            found[f"{section}.{field.name}"] = getattr(value, field.name)
    return found


def provider_defaults() -> dict[str, Any]:
    provider = minimal().providers[0]
    return {key: getattr(provider, key) for key in ("selector", "token_url", "soft_limit_percent")}


def readme_table() -> dict[str, str]:
    """README's config table: key -> the default cell, one entry per key of a combined row."""
    text = (ROOT / "README.md").read_text()
    table = text.split("## Config reference", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        keys = re.findall(r"`([^`]+)`", cells[0])
        values = re.findall(r"`([^`]*)`", cells[1]) or [cells[1]]
        if len(keys) > 1:
            # `limits.a`, `b`, `c` | `1`, `2`, `3`: later names share the first one's section.
            assert len(values) == len(keys), line
            section = keys[0].rsplit(".", 1)[0] + "." if "." in keys[0] else ""
            keys = [keys[0], *(section + k for k in keys[1:])]
        for index, key in enumerate(keys):
            rows[key] = values[index] if len(keys) > 1 else values[0]
    return rows


def matches(default: Any, shown: object) -> bool:
    """Does ``shown`` (README text or a JSON value) say ``default``?"""
    if isinstance(shown, str):
        if default is None:
            return shown in ("none", "null", "")
        if isinstance(default, tuple):
            return shown == "[]"
        if isinstance(default, int | float) and not isinstance(default, bool):
            try:
                return float(shown) == float(default)
            except ValueError:
                return False
        return shown == str(default)
    if isinstance(default, tuple):
        return shown == list(default)
    if isinstance(default, int | float) and isinstance(shown, int | float) and not isinstance(shown, bool):
        return float(shown) == float(default)
    return shown == (str(default) if default is not None and not isinstance(default, bool | str) else default)


def flatten(doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if key.startswith("$comment"):
            continue
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("key", sorted(defaults()))
def test_readme_shows_the_default(key: str) -> None:
    table = readme_table()
    assert key in table, f"README's config table does not list {key}"
    default = defaults()[key]
    assert matches(default, table[key]), f"README says {key} defaults to {table[key]!r}; config.py: {default!r}"


@pytest.mark.parametrize("key", sorted(provider_defaults()))
def test_readme_shows_the_provider_default(key: str) -> None:
    shown = readme_table()[f"providers.<name>.{key}"]
    default = provider_defaults()[key]
    assert matches(default, shown), f"README says providers.<name>.{key} defaults to {shown!r}; config.py: {default!r}"


def test_readme_lists_no_key_that_does_not_exist() -> None:
    known = set(defaults()) | {f"providers.<name>.{f.name}" for f in fields(Provider) if f.name != "name"}
    known.add("providers.<name>")
    assert set(readme_table()) - known == set()


@pytest.mark.parametrize("key", sorted(defaults()))
def test_the_example_config_shows_the_default(key: str) -> None:
    example = flatten(orjson.loads((ROOT / "config.example.json").read_bytes()))
    assert key in example, f"config.example.json does not show {key}"
    if key in EXAMPLE_SHOWS_A_CHOICE:
        assert not matches(defaults()[key], example[key]), f"{key} is the default now: drop it from the exceptions"
        return
    assert matches(defaults()[key], example[key]), f"config.example.json: {key} = {example[key]!r}"


def test_the_example_providers_show_their_derived_defaults() -> None:
    """Each example provider, parsed from mount and upstream alone, gets every other value it shows."""
    doc = orjson.loads((ROOT / "config.example.json").read_bytes())
    for name, spec in doc["providers"].items():
        if name.startswith("$comment"):
            continue
        bare = {"mount": spec["mount"], "upstream": spec["upstream"]}
        [provider] = parse_config(CONFIG, {"providers": {name: bare}}).providers
        for key, value in flatten(spec).items():
            if key in ("mount", "upstream") or f"providers.{name}.{key}" in EXAMPLE_SHOWS_A_CHOICE:
                continue
            assert matches(getattr(provider, key), value), f"config.example.json: providers.{name}.{key} = {value!r}"


def test_the_example_parses() -> None:
    parse_config(CONFIG, orjson.loads((ROOT / "config.example.json").read_bytes()))
