"""credproxy's own endpoints, on the proxy's port under ``/_credproxy/``.

==========================================  ==================================================
``GET  /_credproxy/health``                 ``{"status": "ok"}`` while the process serves
``GET  /_credproxy/status``                 every credential's state, usage and counters (JSON)
``GET  /_credproxy/metrics``                Prometheus text exposition
``GET  /_credproxy/which?session=&provider=``  the order a session gets, and who serves it now
``POST /_credproxy/credentials/<label>/unblock``  put a credential back in rotation now
``GET  /_credproxy/state``                  the shared state backend's view (file or Redis)
==========================================  ==================================================

No answer here ever holds a token (see :mod:`proxy.admin.status`). Mounts cannot overlap the prefix
(:mod:`proxy.config` refuses it), and any other path under it falls through to the forwarder's 404.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from proxy import __version__
from proxy.admin.status import credential_doc, status_document, which_document
from proxy.config import ADMIN_PREFIX
from proxy.core.clock import Clock
from proxy.core.pool import Pool
from proxy.observe.metrics import Metrics

log = logging.getLogger("credproxy.admin")


class Admin:
    """The handlers; ``extras`` add sections to the status document (file sync, token custody);
    ``views`` add JSON endpoints of their own (``GET /_credproxy/<name>``)."""

    def __init__(self, pool: Pool, clock: Clock, metrics: Metrics) -> None:
        self._pool = pool
        self._clock = clock
        self._metrics = metrics
        self.extras: dict[str, Callable[[], dict[str, Any]]] = {}
        self.views: dict[str, Callable[[], Any]] = {}

    def install(self, router: web.UrlDispatcher) -> None:
        router.add_get(f"{ADMIN_PREFIX}/health", self.health)
        router.add_get(f"{ADMIN_PREFIX}/status", self.status)
        router.add_get(f"{ADMIN_PREFIX}/metrics", self.metrics)
        router.add_get(f"{ADMIN_PREFIX}/which", self.which)
        router.add_post(f"{ADMIN_PREFIX}/credentials/{{label}}/unblock", self.unblock)
        for name, view in self.views.items():
            router.add_get(f"{ADMIN_PREFIX}/{name}", self._view(view))

    @staticmethod
    def _view(view: Callable[[], Any]) -> Callable[[web.Request], Any]:
        async def handle(request: web.Request) -> web.Response:
            return _json(200, view())

        return handle

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def status(self, request: web.Request) -> web.Response:
        doc = status_document(self._pool, self._clock.time(), __version__)
        for name, source in self.extras.items():
            doc[name] = source()
        return _json(200, doc)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self._metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def which(self, request: web.Request) -> web.Response:
        names = [p.name for p in self._pool.providers()]
        provider = request.query.get("provider")
        if provider is None:
            # The only provider, or else the only one with credentials.
            candidates = names if len(names) == 1 else [n for n in names if self._pool.credentials(n)]
            if len(candidates) != 1:
                return _error(400, f"several providers are configured; name one with provider= ({', '.join(names)})")
            provider = candidates[0]
        if provider not in names:
            return _error(404, f"no provider named {provider!r} (configured: {', '.join(names)})")
        session = request.query.get("session") or None
        return _json(200, which_document(self._pool, provider, session, self._clock.time()))

    async def unblock(self, request: web.Request) -> web.Response:
        label = request.match_info["label"]
        cred = self._pool.by_label(label)
        if cred is None:
            return _error(404, f"no credential labelled {label!r}")
        self._pool.unblock(cred)
        log.info("credential %s unblocked by an admin request", cred.label)
        return _json(200, credential_doc(cred, self._pool.state(cred), self._clock.time(), self._pool.secrets()))


def _json(status: int, doc: object) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(doc), content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return _json(status, {"error": {"message": message, "type": "invalid_request_error", "code": "admin"}})
