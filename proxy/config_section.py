"""Typed reading of one JSON object of a config file, with errors that name the file and the key.

A :class:`Section` refuses unknown keys (any key starting with ``$comment`` is allowed: JSON has no
comments) and every value of the wrong type or out of range, raising a
:class:`~proxy.errors.ConfigError` such as ``config.json at providers.openai.upstream: ...``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from proxy.errors import ConfigError

T = TypeVar("T")


class Section:
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

    def strings(self, name: str, check: Callable[[str], str | None]) -> tuple[str, ...]:
        """A list of strings, each passing ``check`` (which returns a problem or ``None``)."""
        values = self.get(name, list, [], "a list of strings")
        for index, value in enumerate(values):
            if not isinstance(value, str):
                raise self.fail(f"{name}[{index}]", f"must be a string, not {type(value).__name__}")
            problem = check(value)
            if problem is not None:
                raise self.fail(f"{name}[{index}]", problem)
        return tuple(values)

    def section(self, name: str, allowed: tuple[str, ...]) -> Section:
        value = self.get(name, dict, {}, "an object")
        return Section(self.path, value, self.key(name), allowed)


def as_object(path: Path, key: str, value: object) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(path, key, f"must be an object, not {type(value).__name__}")
    return value
