"""Background tasks that cannot die quietly, and what is degraded while credproxy keeps serving.

A background loop (the file sync, the Redis sync) that meets an error nobody expected would end for
good and say nothing: asyncio keeps the exception until someone awaits the task, which happens at
shutdown, and then the shutdown's own work (the final write of state and tokens) is skipped too.
:class:`Supervised` runs such a loop instead: an unexpected error is logged once per cause (the
same error again is not logged again), the loop starts over after a back-off
(:func:`proxy.core.backoff.backoff`), and until the loop says it finished a round as it should
(:meth:`Supervised.ok`) it is reported as "<name> restarting".

A :class:`Problem` is one thing that does not work while requests are still served: a state file
that cannot be written, tokens that exist only in memory, Redis away, a task restarting. Its
``what`` is a short fixed phrase (``GET /_credproxy/health`` answers it to anyone: no path, no
label); its ``detail`` says why (in the status document, behind the client token). Neither ever
holds a secret.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from proxy.core.backoff import backoff
from proxy.core.secret import redact

log = logging.getLogger("credproxy.supervise")

#: Restart delays of a failed task: the first, doubling up to the cap.
RESTART_FIRST = 1.0
RESTART_MAX = 60.0
#: How long :meth:`Supervised.stop` waits for a cancelled task before cancelling it again.
STOP_PATIENCE = 1.0


@dataclass(frozen=True, slots=True)
class Problem:
    what: str
    detail: str

    def to_json(self) -> dict[str, str]:
        return {"what": self.what, "detail": self.detail}


class Supervised:
    """``run`` as a background task, restarted with back-off whenever it raises (cancellation stops it)."""

    def __init__(self, name: str, run: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self.name = name
        self._run = run
        self.first = RESTART_FIRST
        self.cap = RESTART_MAX
        self.failures = 0  # in a row, since the last good round
        self.restarts = 0  # since start
        self.cause = ""  # the last unexpected error, until a good round
        self._logged = ""
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name=f"credproxy {self.name}")

    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        """Cancel the task and wait for it to end; cancel again should it swallow a cancellation (code
        the task awaits may do that: ``asyncio.wait_for`` on Python 3.11), so that a shutdown never hangs."""
        task, self._task = self._task, None
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=STOP_PATIENCE)

    def ok(self) -> None:
        """The task finished a round as it should: it is no longer restarting."""
        if self.cause:
            log.info("%s works again", self.name)
        self.failures, self.cause, self._logged = 0, "", ""

    def problems(self) -> list[Problem]:
        return [Problem(f"{self.name} restarting", self.cause)] if self.cause else []

    async def _supervise(self) -> None:
        while True:
            try:
                await self._run()
                return
            except Exception as exc:  # the point: nothing but a cancel ends this task
                self.failures += 1
                self.restarts += 1
                delay = backoff(self.failures, self.first, self.cap)
                self.cause = describe(exc)
                if self.cause != self._logged:
                    self._logged = self.cause
                    log.error("%s failed (%s); restarting it in %.3g s", self.name, self.cause, delay, exc_info=exc)
            await asyncio.sleep(delay)


def describe(exc: BaseException) -> str:
    """``Type: message`` of an unexpected error (of the first one inside a task group's, which says
    nothing itself), with anything shaped like a secret masked."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return redact(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
