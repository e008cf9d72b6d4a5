"""Where credential state lives beyond one process: the state backend interface, and choosing one.

A backend is fed by the pool's listeners (every local block, disable, unblock, usage) and merges
views from elsewhere back through :meth:`proxy.core.pool.Pool.apply`; requests never wait for it.

* ``file`` (default): memory plus the state file beside the credentials file, and hot reload of the
  credentials file (:class:`proxy.storage.file_backend.FileSync`). Enough for one process, and for several
  processes on one host sharing the files.
* ``redis``: the same, plus state, refresh custody and rotated tokens shared on Redis, for replicas
  that share no file (:class:`proxy.storage.redis_backend.RedisState`). Its module, and redis-py, are
  imported only when configured.
"""

from __future__ import annotations

from typing import Any, Protocol

from aiohttp import web

from proxy.accounts.custody import Custodian
from proxy.config import Config
from proxy.core.clock import Clock
from proxy.core.pool import Pool
from proxy.core.secret import public_code
from proxy.observe.supervise import Problem
from proxy.storage.file_backend import FileSync


class StateBackend(Protocol):
    async def start(self) -> None:
        """Begin syncing (called once the event loop runs)."""
        ...

    async def close(self, deadline: float | None = None) -> None:
        """Stop, after a last attempt to write what is pending; tokens that exist only in memory are
        tried again until they are written or the event loop's clock reaches ``deadline``."""
        ...

    def status(self) -> dict[str, Any]:
        """What an operator needs to know (never a secret)."""
        ...

    def problems(self) -> list[Problem]:
        """What does not work as it should now (state not written, Redis away, a task restarting)."""
        ...


def make_backend(config: Config, pool: Pool, clock: Clock, custodian: Custodian, files: FileSync) -> StateBackend:
    if config.state.backend == "redis":
        from proxy.storage.redis_backend import RedisState  # noqa: PLC0415 (redis-py only when configured)

        return RedisState(config, pool, clock, custodian, files)
    return files


def state_view(pool: Pool, backend: StateBackend, now: float) -> dict[str, Any]:
    """The body of ``GET /_credproxy/state``: this replica's view of every credential, and its backend."""
    credentials = []
    for cred in pool.all_credentials():
        state = pool.view(cred)
        credentials.append(
            {
                "provider": cred.provider,
                "label": cred.label,
                "available": pool.available(cred, now),
                "blocked_until": state.blocked_until if state.blocked_until > now else None,
                "reason": public_code(state.block_reason, pool.secrets()) if state.blocked_until > now else "",
                "disabled": state.disabled,
            }
        )
    return {"backend": backend.status(), "credentials": credentials}


STATE: web.AppKey[StateBackend] = web.AppKey("state")
