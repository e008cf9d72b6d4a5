"""The one builder of credproxy's own JSON answers: errors in OpenAI's shape, and other JSON documents.

Every error credproxy itself answers (the forwarder's 4xx and 5xx, the guard's refusals, the servers'
408 and 503, the admin endpoints' 400 and 404) has the body
``{"error": {"message", "type", "param": null, "code"}}``, with ``type`` ``invalid_request_error``
below 500 and ``proxy_error`` from 500 on. ``message`` never holds a secret: callers pass fixed
text and labels. An ``x-credproxy-attempts`` header says how many upstream attempts were made, when
the answer comes after some.
"""

from __future__ import annotations

import orjson
from aiohttp import web

from proxy.core.guard import Refusal
from proxy.observe.record import RequestRecord


def error_document(status: int, message: str, code: str) -> dict[str, object]:
    kind = "invalid_request_error" if status < 500 else "proxy_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def json_response(status: int, body: object, record: RequestRecord | None = None) -> web.Response:
    response = web.Response(status=status, body=orjson.dumps(body), content_type="application/json")
    if record is not None:
        response.headers["x-credproxy-attempts"] = str(record.attempts)
    return response


def error_response(status: int, message: str, code: str, record: RequestRecord | None = None) -> web.Response:
    """A proxy-made error in OpenAI's shape. ``message`` never contains a secret."""
    return json_response(status, error_document(status, message, code), record)


def refusal_response(refusal: Refusal) -> web.Response:
    """What a client the guard refused gets; it gets no kept-alive connection to sit on."""
    response = error_response(refusal.status, refusal.message, refusal.code)
    response.force_close()
    # Retrying cannot help; Claude Code would retry a 401 ten times over three minutes without it.
    response.headers["x-should-retry"] = "false"
    if refusal.status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="credproxy"'
    return response
