"""Frames of the Responses WebSocket: the same classification and reset hints as HTTP (protocol.md 3, 11)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from proxy.core import wsframes
from proxy.core.ratelimits import Kind, classify, error_info

NOW = 1_800_000_000.0


def error_frame(status_key: str | None = "status", status: int = 429, **error: Any) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "error", "error": error or {"type": "usage_limit_reached"}}
    if status_key is not None:
        frame[status_key] = status
    return frame


@pytest.mark.parametrize(
    ("frame", "kind", "reason", "until", "source"),
    [
        # The real backend's usage-limit frame: resets_at decides (plan window).
        (
            error_frame(type="usage_limit_reached", resets_at=NOW + 3600),
            Kind.LIMITED,
            "usage_limit_reached",
            3600,
            "plan_window",
        ),
        # status_code is an alias of status.
        (
            error_frame("status_code", type="usage_limit_reached", resets_in_seconds=120),
            Kind.LIMITED,
            "usage_limit_reached",
            120,
            "plan_window",
        ),
        # A limit code without any status is still a limit (the code decides, as for HTTP).
        (
            error_frame(None, type="usage_limit_reached", resets_in_seconds=60),
            Kind.LIMITED,
            "usage_limit_reached",
            60,
            "plan_window",
        ),
        # A bare 429: no hint, the default cool-down.
        (
            error_frame(type="tokens", code="rate_limit_exceeded", message="slow down"),
            Kind.LIMITED,
            "rate_limit_exceeded",
            60,
            "default",
        ),
        # The hint inside the message, as for HTTP.
        (
            error_frame(code="rate_limit_exceeded", message="Please try again in 1.5s."),
            Kind.LIMITED,
            "rate_limit_exceeded",
            1.5,
            "message",
        ),
        (error_frame(status=429, type="insufficient_quota"), Kind.LIMITED, "insufficient_quota", 86400, "default"),
        (error_frame(status=401, code="invalid_api_key"), Kind.UNAUTHORIZED, "invalid_api_key", 0, ""),
        (
            error_frame(status=400, code="previous_response_not_found"),
            Kind.BAD_CONTINUATION,
            "previous_response_not_found",
            0,
            "",
        ),
        (
            error_frame(status=400, type="invalid_request_error", code="websocket_connection_limit_reached"),
            Kind.ERROR,
            "websocket_connection_limit_reached",
            0,
            "",
        ),
        (error_frame(status=500, type="server_error", code="server_error"), Kind.ERROR, "server_error", 0, ""),
        # An error frame without status or known code: an error, never "ok".
        ({"type": "error", "error": {"message": "?"}}, Kind.ERROR, "error", 0, ""),
        # A response.failed with a limit code is a limit; with another code it is the client's to see.
        (
            {
                "type": "response.failed",
                "response": {"error": {"code": "rate_limit_exceeded", "message": "try again in 2s"}},
            },
            Kind.LIMITED,
            "rate_limit_exceeded",
            2,
            "message",
        ),
        ({"type": "response.failed", "response": {"error": {"code": "server_error"}}}, Kind.OK, "", 0, ""),
        ({"type": "response.completed", "response": {"id": "r"}}, Kind.OK, "", 0, ""),
    ],
)
def test_a_frame_is_classified_like_an_http_answer(
    frame: dict[str, Any], kind: Kind, reason: str, until: float, source: str
) -> None:
    found = wsframes.verdict(frame, NOW)
    assert (found.kind, found.reason, found.source) == (kind, reason, source)
    if kind is Kind.LIMITED:
        assert found.until == NOW + until


def test_the_frame_headers_are_the_answer_headers() -> None:
    """An exhausted x-codex window in the frame's headers gives the reset (any case, numbers too)."""
    frame = error_frame(type="usage_limit_reached")
    frame["headers"] = {
        "X-Codex-Primary-Used-Percent": "100.0",
        "x-codex-primary-reset-after-seconds": 7200,
        "x-codex-secondary-used-percent": 12.5,
        "x-codex-secondary-reset-after-seconds": "999999",
        "not-a-string": ["x"],
    }
    assert wsframes.frame_headers(frame) == {
        "x-codex-primary-used-percent": "100.0",
        "x-codex-primary-reset-after-seconds": "7200",
        "x-codex-secondary-used-percent": "12.5",
        "x-codex-secondary-reset-after-seconds": "999999",
    }
    found = wsframes.verdict(frame, NOW)
    assert (found.kind, found.until, found.source) == (Kind.LIMITED, NOW + 7200, "plan_window")
    # Exactly what the HTTP classifier makes of the same status, headers and body.
    http = classify(429, wsframes.frame_headers(frame), error_info({"error": frame["error"]}), NOW)
    assert found == http


def test_retry_after_in_the_frame_headers() -> None:
    frame = error_frame(code="rate_limit_exceeded", message="x")
    frame["headers"] = {"Retry-After": "30", "retry-after-ms": "1500"}
    found = wsframes.verdict(frame, NOW)
    assert (found.until, found.source) == (NOW + 1.5, "retry-after-ms")


def test_consecutive_limits_without_hints_back_off() -> None:
    frame = error_frame(code="rate_limit_exceeded", message="x")
    assert wsframes.verdict(frame, NOW, consecutive=2).until == NOW + 240


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b'{"type":"response.output_text.delta","delta":"x"}', "response.output_text.delta"),
        (b'{"type":"error","status":429}', "error"),
        (b'{"status":429,"type":"error"}', None),  # not first: the caller parses
        (b'{"type": "error"}', None),  # a space: not the compact form
        (b'{"type":"' + b"x" * 100 + b'"}', None),
        (b"[1]", None),
        (b'{"type":"\xff"}', None),
    ],
)
def test_frame_type_reads_only_the_start(data: bytes, kind: str | None) -> None:
    assert wsframes.frame_type(data) == kind


def test_parse_and_the_status_alias() -> None:
    assert wsframes.parse(b"not json") is None
    assert wsframes.parse(b"[1, 2]") is None
    assert wsframes.status_of({"status_code": 429}) == 429
    assert wsframes.status_of({"status": True}) == 0
    assert wsframes.status_of({"status": 99}) == 0
    assert wsframes.is_connection_limit(error_frame(status=400, code="websocket_connection_limit_reached"))
    assert not wsframes.is_connection_limit(error_frame())


def test_the_exhausted_frame_codex_shows_as_a_usage_limit() -> None:
    """status (Codex ignores an error frame without one), usage_limit_reached, resets_at: the earliest reset."""
    frame = orjson.loads(wsframes.exhausted_frame("codex", NOW + 1799.2, NOW, "every credential is limited"))
    assert frame == {
        "type": "error",
        "status": 429,
        "error": {
            "type": "usage_limit_reached",
            "message": "every credential is limited; retry in 1800 s",
            "resets_at": int(NOW) + 1800,
            "resets_in_seconds": 1800,
        },
        "headers": {"retry-after": "1800"},
    }
    # Classified by credproxy's own rules, it is the limit it describes.
    found = wsframes.verdict(frame, NOW)
    assert (found.kind, found.until) == (Kind.LIMITED, NOW + 1800)


def test_the_exhausted_frame_of_an_api_key_provider_and_of_a_pool_that_will_not_come_back() -> None:
    frame = orjson.loads(wsframes.exhausted_frame("openai", NOW + 5, NOW, "limited"))
    assert frame["status"] == 429
    assert frame["error"]["code"] == "rate_limit_exceeded"
    assert frame["headers"] == {"retry-after": "5"}
    frame = orjson.loads(wsframes.exhausted_frame("codex", None, NOW, "every credential is disabled"))
    assert frame == {
        "type": "error",
        "status": 503,
        "error": {
            "type": "proxy_error",
            "code": "no_credentials",
            "message": "every credential is disabled",
            "param": None,
        },
    }
