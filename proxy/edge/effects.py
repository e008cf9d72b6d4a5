"""The replay plan's effects on the pool, and how they are said in the log.

A :class:`~proxy.core.replay.ReplayPlan` answers with effects before each step: :class:`Block` a
limited credential until its reset, :class:`Disable` one that needs a human. Every driver of a plan
(an HTTP request in :mod:`proxy.edge.forward`, the opening of an upstream WebSocket in
:mod:`proxy.edge.ws_open`) and a limit met later (late in a committed stream, on an open socket)
carries them out here, so the pool is changed, and the change logged, in one way only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from proxy.core.clock import Clock, readable_until
from proxy.core.pool import Pool
from proxy.core.replay import NEEDS_RELOGIN, Block, Command, Disable

log = logging.getLogger("credproxy")

#: What a block means for the request that met it (the end of the log line).
NEXT = "; trying the next one"


def carry_out(pool: Pool, clock: Clock, effects: Sequence[Command], then: str = NEXT, who: str = "") -> None:
    """Apply ``effects`` (blocks and disables; steps are ignored) to ``pool``. ``then`` ends a block's log
    line (what happens to the request); ``who`` starts it (which socket, for the WebSocket)."""
    for effect in effects:
        if type(effect) is Block:
            verdict = effect.verdict
            pool.block(effect.cred, verdict)
            log.info(
                "%scredential %s limited (%s) until %s (from %s)%s",
                who,
                effect.cred.label,
                verdict.reason,
                readable_until(verdict.until, clock.time()),
                verdict.source,
                then,
            )
        elif type(effect) is Disable:
            pool.disable(effect.cred, effect.reason)
            if effect.reason == NEEDS_RELOGIN:
                log.warning(
                    "%scredential %s is refused (401) even after a refresh; it needs a re-login", who, effect.cred.label
                )
            else:
                log.warning(
                    "%scredential %s was refused (401 %s); disabled until a human fixes it",
                    who,
                    effect.cred.label,
                    effect.verdict.reason,
                )
