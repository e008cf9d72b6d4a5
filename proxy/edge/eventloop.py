"""Which event loop runs the server: uvloop when it is installed (it is a dependency on Linux and macOS).

uvloop's transports and loop run in C; for a proxy, whose work is mostly moving bytes between
sockets, that removes a third or more of the CPU per request. The standard loop stays the fallback
(Windows, or an install without it), with identical behaviour.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from types import ModuleType
from typing import Any, TypeVar

T = TypeVar("T")

uvloop: ModuleType | None
try:
    import uvloop
except ImportError:  # pragma: no cover - Windows, or installed without it
    uvloop = None


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    if uvloop is None:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on uvloop when available."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
