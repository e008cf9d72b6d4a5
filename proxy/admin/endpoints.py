"""credproxy's own endpoints, on the proxy's port under ``/_credproxy/``.

==========================================  ==================================================
``GET  /_credproxy/health``                 ``{"status": "ok"}``, or ``"degraded"`` and what is (still 200)
``GET  /_credproxy/status``                 every credential's state, usage and counters (JSON)
``GET  /_credproxy/metrics``                Prometheus text exposition
``GET  /_credproxy/which?session=&provider=``  the order a session gets, and who serves it now
``POST /_credproxy/credentials/<label>/unblock``  put a credential back in rotation now
``GET  /_credproxy/state``                  the shared state backend's view (file or Redis)
==========================================  ==================================================

No answer here ever holds a token (see :mod:`proxy.admin.status`). Mounts cannot overlap the prefix
(:mod:`proxy.config` refuses it); any other path or method under it is a 404 (``not_found``).

``/health`` answers anyone (it is the container's liveness probe), so it names what is degraded by
fixed phrases only ("state not persisted", "tokens not persisted", "credentials file unreadable",
"Redis unavailable", "<task> restarting"); the causes, with paths and labels, are in ``/status``
under ``degraded``. It stays HTTP 200 while degraded: restarting the process would fix none of these
(a read-only folder, a full disk, Redis away) and would lose tokens that exist only in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from proxy import __version__
from proxy.admin.status import credential_doc, status_document, which_document
from proxy.config import ADMIN_PREFIX
from proxy.core.clock import Clock
from proxy.core.pool import Pool
from proxy.edge.aiohttp_server import AiohttpClient
from proxy.edge.client import Client, Incoming
from proxy.edge.dispatch import admin_path
from proxy.edge.error_body import error_response
from proxy.observe.metrics import Metrics
from proxy.observe.supervise import Problem

log = logging.getLogger("credproxy.admin")


class Admin:
    """The endpoints; ``extras`` add sections to the status document (file sync, token custody);
    ``views`` add JSON endpoints of their own (``GET /_credproxy/<name>``).

    :meth:`serve` answers on the client seam (:mod:`proxy.edge.client`), so both servers answer the
    same way: the fast one calls it directly, aiohttp's through the route :meth:`install` adds."""

    def __init__(self, pool: Pool, clock: Clock, metrics: Metrics) -> None:
        self._pool = pool
        self._clock = clock
        self._metrics = metrics
        self.extras: dict[str, Callable[[], dict[str, Any]]] = {}
        self.views: dict[str, Callable[[], Any]] = {}
        self.problems: list[Callable[[], list[Problem]]] = []

    def degraded(self) -> list[Problem]:
        """Everything that does not work as it should now (the request path still serves)."""
        return [problem for source in self.problems for problem in source()]

    def install(self, router: web.UrlDispatcher) -> None:
        """Every path under the prefix, for aiohttp's server (ahead of the forwarder's catch-all)."""
        router.add_route("*", ADMIN_PREFIX, self.handle)
        router.add_route("*", f"{ADMIN_PREFIX}/{{tail:.*}}", self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        client = AiohttpClient(request)
        await self.serve(client.incoming(), client)
        assert client.response is not None
        return client.response

    async def serve(self, incoming: Incoming, client: Client) -> int:
        """Answer one request under the prefix; returns the status."""
        return await client.respond(self.answer(incoming.method, incoming.raw_path))

    def answer(self, method: str, target: str) -> web.Response:
        path, _, query = target.partition("?")
        path = admin_path(path) or path
        name = path.removeprefix(ADMIN_PREFIX + "/")
        if method in ("GET", "HEAD"):
            if name == "health":
                return self.health()
            if name == "status":
                return self.status()
            if name == "metrics":
                return web.Response(body=self._metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})
            if name == "which":
                values = dict(parse_qsl(query, keep_blank_values=True))
                return self.which(values.get("provider"), values.get("session") or None)
            if name in self.views:
                return _json(200, self.views[name]())
        elif method == "POST":
            parts = name.split("/")
            if len(parts) == 3 and parts[0] == "credentials" and parts[1] and parts[2] == "unblock":
                return self.unblock(parts[1])
        return error_response(404, f"credproxy has no endpoint {method} {path}", "not_found")

    def health(self) -> web.Response:
        problems = self.degraded()
        if not problems:
            return web.json_response({"status": "ok"})
        return web.json_response({"status": "degraded", "degraded": sorted({p.what for p in problems})})

    def status(self) -> web.Response:
        doc = status_document(self._pool, self._clock.time(), __version__)
        for name, source in self.extras.items():
            doc[name] = source()
        doc["degraded"] = [problem.to_json() for problem in self.degraded()]
        return _json(200, doc)

    def which(self, provider: str | None, session: str | None) -> web.Response:
        names = [p.name for p in self._pool.providers()]
        if provider is None:
            # The only provider, or else the only one with credentials.
            candidates = names if len(names) == 1 else [n for n in names if self._pool.credentials(n)]
            if len(candidates) != 1:
                return _error(400, f"several providers are configured; name one with provider= ({', '.join(names)})")
            provider = candidates[0]
        if provider not in names:
            return _error(404, f"no provider named {provider!r} (configured: {', '.join(names)})")
        return _json(200, which_document(self._pool, provider, session, self._clock.time()))

    def unblock(self, label: str) -> web.Response:
        cred = self._pool.by_label(label)
        if cred is None:
            return _error(404, f"no credential labelled {label!r}")
        self._pool.unblock(cred)
        log.info("credential %s unblocked by an admin request", cred.label)
        return _json(200, credential_doc(cred, self._pool.view(cred), self._clock.time(), self._pool.secrets()))


def _json(status: int, doc: object) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(doc), content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return error_response(status, message, "admin")
