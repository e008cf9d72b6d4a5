"""Pure table tests: classification of upstream answers and reset hints (reliability.md 1.6, F8-F15).

``NOW`` is Fri, 15 Jan 2027 08:00:00 GMT, so HTTP dates in the tables read as offsets from it.
"""

from __future__ import annotations

import pytest

from proxy.core.ratelimits import ErrorInfo, Kind, Verdict, _number, classify, error_info, request_too_large
from proxy.core.sse import parse_json
from proxy.testing.fake_bodies import (
    ACCOUNT_DEACTIVATED,
    INCORRECT_API_KEY,
    MISSING_SCOPES,
    REQUEST_TOO_LARGE,
    openai_error,
)

NOW = 1_800_000_000.0
DAY = 86400.0
WEEK = 7 * DAY
EIGHT_DAYS = 8 * DAY


def usage_limit(**fields: object) -> ErrorInfo:
    return ErrorInfo(code="usage_limit_reached", **fields)  # type: ignore[arg-type]


def limited(
    headers: dict[str, str], error: ErrorInfo | None = None, status: int = 429, consecutive: int = 0
) -> tuple[float, str, bool]:
    """``(seconds blocked, source, clamped)`` of a LIMITED verdict."""
    verdict = classify(status, headers, error, NOW, consecutive)
    assert verdict.kind is Kind.LIMITED
    assert not verdict.attention
    return verdict.until - NOW, verdict.source, verdict.clamped


@pytest.mark.parametrize(
    ("consecutive", "seconds"),
    [(-3, 60.0), (0, 60.0), (1, 120.0), (2, 240.0), (3, 480.0), (4, 960.0), (5, 1800.0), (6, 1800.0), (500, 1800.0)],
)
def test_bare_429_gets_the_default_cooldown_doubling_up_to_30_minutes(consecutive: int, seconds: float) -> None:
    """F12."""
    assert classify(429, {}, None, NOW, consecutive) == Verdict(
        Kind.LIMITED, reason="rate_limited", until=NOW + seconds, source="default"
    )


@pytest.mark.parametrize(
    ("headers", "seconds", "source"),
    [
        # F8: retry-after-ms is more precise and wins over Retry-After.
        ({"retry-after-ms": "1500", "retry-after": "2"}, 1.5, "retry-after-ms"),
        ({"retry-after-ms": "2500"}, 2.5, "retry-after-ms"),
        ({"retry-after-ms": "250"}, 1.0, "retry-after-ms"),  # every block lasts at least a second
        ({"retry-after": "2"}, 2.0, "retry-after"),
        ({"retry-after": " 30 "}, 30.0, "retry-after"),
        ({"retry-after": "2.5"}, 2.5, "retry-after"),
        # F9: Retry-After as an HTTP date, in the future or in the past.
        ({"retry-after": "Fri, 15 Jan 2027 08:00:30 GMT"}, 30.0, "retry-after"),
        ({"retry-after": "Fri, 15 Jan 2027 09:00:00 GMT"}, 3600.0, "retry-after"),
        ({"retry-after": "Fri, 15 Jan 2027 09:00:30 +0100"}, 30.0, "retry-after"),
        ({"retry-after": "Fri, 15 Jan 2027 07:59:00 GMT"}, 1.0, "retry-after"),
        ({"retry-after": "Thu, 01 Jan 1970 00:00:00 GMT"}, 1.0, "retry-after"),
        # F10: x-ratelimit-reset-*, for the limit that x-ratelimit-remaining-* says is exhausted.
        (
            {
                "x-ratelimit-reset-requests": "1s",
                "x-ratelimit-reset-tokens": "6m0s",
                "x-ratelimit-remaining-requests": "5",
                "x-ratelimit-remaining-tokens": "0",
            },
            360.0,
            "x-ratelimit-reset",
        ),
        (
            {
                "x-ratelimit-reset-requests": "2s",
                "x-ratelimit-reset-tokens": "6m0s",
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-remaining-tokens": "1500",
            },
            2.0,
            "x-ratelimit-reset",
        ),
        (
            {
                "x-ratelimit-reset-requests": "2s",
                "x-ratelimit-reset-tokens": "6m0s",
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-remaining-tokens": "0",
            },
            360.0,
            "x-ratelimit-reset",
        ),
        # Nothing says which limit is exhausted: the later of the two.
        ({"x-ratelimit-reset-requests": "2s", "x-ratelimit-reset-tokens": "6m0s"}, 360.0, "x-ratelimit-reset"),
        ({"x-ratelimit-reset-requests": "2s"}, 2.0, "x-ratelimit-reset"),
        # The exhausted limit's reset is unreadable: the other one still counts.
        (
            {
                "x-ratelimit-reset-requests": "2s",
                "x-ratelimit-reset-tokens": "forever",
                "x-ratelimit-remaining-tokens": "0",
            },
            2.0,
            "x-ratelimit-reset",
        ),
        # Go durations.
        ({"x-ratelimit-reset-tokens": "20ms"}, 1.0, "x-ratelimit-reset"),
        ({"x-ratelimit-reset-tokens": "1m30s"}, 90.0, "x-ratelimit-reset"),
        ({"x-ratelimit-reset-tokens": "1h2m3.5s"}, 3723.5, "x-ratelimit-reset"),
        ({"x-ratelimit-reset-tokens": "6m0s"}, 360.0, "x-ratelimit-reset"),
        ({"x-ratelimit-reset-tokens": "1.5h"}, 5400.0, "x-ratelimit-reset"),
        ({"x-ratelimit-reset-tokens": ".5s"}, 1.0, "x-ratelimit-reset"),
        ({"x-ratelimit-reset-tokens": "1500000us"}, 1.5, "x-ratelimit-reset"),
        ({"x-ratelimit-reset-tokens": "2000000000ns"}, 2.0, "x-ratelimit-reset"),
        # Priorities between groups: Retry-After beats x-ratelimit-*.
        ({"retry-after": "5", "x-ratelimit-reset-tokens": "6m0s"}, 5.0, "retry-after"),
        ({"retry-after-ms": "5000", "x-ratelimit-reset-tokens": "6m0s"}, 5.0, "retry-after-ms"),
    ],
)
def test_reset_hints_in_headers(headers: dict[str, str], seconds: float, source: str) -> None:
    assert limited(headers) == (seconds, source, False)


@pytest.mark.parametrize(
    "duration", ["abc", "", "5", "1x", "1e3s", "-1s", "s", "1 s", "1h 2m", "6m0", "m6s", "1" * 70 + "s"]
)
def test_unparsable_go_durations_fall_back_to_the_default(duration: str) -> None:
    assert limited({"x-ratelimit-reset-tokens": duration, "x-ratelimit-remaining-tokens": "0"}) == (
        60.0,
        "default",
        False,
    )


@pytest.mark.parametrize(
    ("message", "seconds"),
    [
        ("Rate limit reached for gpt-5 on tokens per min (TPM). Please try again in 1.5s.", 1.5),
        ("Please try again in 20ms.", 1.0),
        ("Please try again in 6m0s.", 360.0),
        ("Please try again in 1m30s", 90.0),
        ("Please try again in 1h2m", 3720.0),
        ("Please try again in 2 seconds.", 2.0),
        ("Please TRY AGAIN IN 3s", 3.0),
        ("try again in 1.5sec", 1.5),
        ("Try again in 2 min.", 120.0),
        ("try again in 3 minutes", 180.0),
        ("Try again in 1500ms", 1.5),
    ],
)
def test_try_again_in_the_error_message(message: str, seconds: float) -> None:
    error = ErrorInfo(code="rate_limit_exceeded", message=message)
    assert limited({}, error) == (seconds, "message", False)


@pytest.mark.parametrize(
    "message", ["", "Rate limit reached.", "Please try again later.", "try again in a while", "try again in 5 hours"]
)
def test_a_message_without_a_delay_gives_the_default(message: str) -> None:
    error = ErrorInfo(code="rate_limit_exceeded", message=message)
    assert limited({}, error) == (60.0, "default", False)


def test_the_message_is_the_last_hint_consulted() -> None:
    error = ErrorInfo(code="rate_limit_exceeded", message="Please try again in 1.5s.")
    assert limited({"x-ratelimit-reset-tokens": "20s"}, error) == (20.0, "x-ratelimit-reset", False)
    assert limited({"retry-after": "4"}, error) == (4.0, "retry-after", False)


PRIMARY_EXHAUSTED = {"x-codex-primary-used-percent": "100", "x-codex-primary-reset-at": str(int(NOW) + 5000)}


@pytest.mark.parametrize(
    ("headers", "error", "seconds", "clamped"),
    [
        # F11: body resets_at (epoch seconds or milliseconds) and resets_in_seconds.
        ({}, usage_limit(resets_at=int(NOW) + 3600), 3600.0, False),
        ({}, usage_limit(resets_at=NOW + 3600.5), 3600.5, False),
        ({}, usage_limit(resets_at=(int(NOW) + 3600) * 1000), 3600.0, False),
        ({}, usage_limit(resets_at=str(int(NOW) + 3600)), 3600.0, False),
        ({}, usage_limit(resets_in_seconds=7200), 7200.0, False),
        ({}, usage_limit(resets_in_seconds="7200"), 7200.0, False),
        ({}, usage_limit(resets_in_seconds=12.5), 12.5, False),
        # Within the plan-window group the later value wins, between body and headers too.
        ({}, usage_limit(resets_at=int(NOW) + 3600, resets_in_seconds=1800), 3600.0, False),
        ({}, usage_limit(resets_at=int(NOW) + 1800, resets_in_seconds=3600), 3600.0, False),
        (PRIMARY_EXHAUSTED, usage_limit(resets_at=int(NOW) + 3600), 5000.0, False),
        (PRIMARY_EXHAUSTED, usage_limit(resets_at=int(NOW) + 9000), 9000.0, False),
        (PRIMARY_EXHAUSTED, None, 5000.0, False),
        (
            {"x-codex-primary-used-percent": "100.0", "x-codex-primary-reset-after-seconds": "13873"},
            None,
            13873.0,
            False,
        ),
        # A window below 100 % does not say when this limit ends.
        (
            {"x-codex-primary-used-percent": "99.5", "x-codex-primary-reset-at": str(int(NOW) + 5000)},
            usage_limit(resets_at=int(NOW) + 3600),
            3600.0,
            False,
        ),
        # The weekly (secondary) window, exhausted: about seven days, honoured.
        (
            {
                "x-codex-primary-used-percent": "40",
                "x-codex-primary-reset-after-seconds": "600",
                "x-codex-secondary-used-percent": "100",
                "x-codex-secondary-reset-after-seconds": "316705",
            },
            None,
            316705.0,
            False,
        ),
        ({}, usage_limit(resets_in_seconds=WEEK), WEEK, False),
        ({}, usage_limit(resets_at=int(NOW + WEEK) * 1000), WEEK, False),
        ({}, usage_limit(resets_in_seconds=EIGHT_DAYS), EIGHT_DAYS, False),
        # Beyond eight days (but within a year): clamped to eight days, and flagged.
        ({}, usage_limit(resets_in_seconds=EIGHT_DAYS + 1), EIGHT_DAYS, True),
        ({}, usage_limit(resets_in_seconds=9 * DAY), EIGHT_DAYS, True),
        ({}, usage_limit(resets_at=int(NOW + 364 * DAY)), EIGHT_DAYS, True),
        # A reset in the past means "now": the minimum block.
        ({}, usage_limit(resets_at=int(NOW) - 100), 1.0, False),
        ({}, usage_limit(resets_at=int(NOW) - 100, resets_in_seconds=30), 30.0, False),
        # The plan window beats Retry-After.
        ({"retry-after": "5"}, usage_limit(resets_in_seconds=3600), 3600.0, False),
    ],
)
def test_plan_window_hints(headers: dict[str, str], error: ErrorInfo | None, seconds: float, clamped: bool) -> None:
    assert limited(headers, error) == (seconds, "plan_window", clamped)


@pytest.mark.parametrize(
    "bad",
    [-5, -0.5, 0, 0.0, "0", float("nan"), float("inf"), float("-inf"), "nan", "1e999", "abc", "", None, True, [], {}],
)
def test_garbage_resets_in_seconds_is_ignored(bad: object) -> None:
    """F13: falls back to the next hint or the default, without an exception."""
    assert limited({}, usage_limit(resets_in_seconds=bad)) == (60.0, "default", False)
    assert limited({"retry-after": "7"}, usage_limit(resets_in_seconds=bad)) == (7.0, "retry-after", False)


@pytest.mark.parametrize(
    "bad",
    [0, -1, "soon", float("nan"), "1e999", True, int(NOW + 400 * DAY), int(NOW + 400 * DAY) * 1000, 10**30],
)
def test_garbage_resets_at_is_ignored(bad: object) -> None:
    assert limited({}, usage_limit(resets_at=bad)) == (60.0, "default", False)
    assert limited({"retry-after-ms": "3000"}, usage_limit(resets_at=bad)) == (3.0, "retry-after-ms", False)


@pytest.mark.parametrize(
    "value", ["-1", "nan", "NaN", "inf", "-inf", "1e999", "abc", "0", "0.0", "-0", "", "  ", str(10**12), "1e15"]
)
@pytest.mark.parametrize("header", ["retry-after", "retry-after-ms"])
def test_garbage_retry_after_is_ignored(header: str, value: str) -> None:
    """F13: -1, nan, 1e999, abc, 0 and absurd values: the next hint or the default, no exception."""
    assert limited({header: value}) == (60.0, "default", False)
    assert limited({header: value}, consecutive=2) == (240.0, "default", False)
    assert limited({header: value, "x-ratelimit-reset-tokens": "6m0s"}) == (360.0, "x-ratelimit-reset", False)


@pytest.mark.parametrize(
    ("headers", "seconds", "source"),
    [
        ({"retry-after-ms": "-5", "retry-after": "3"}, 3.0, "retry-after"),
        ({"retry-after-ms": "0", "retry-after": "30"}, 30.0, "retry-after"),
        ({"retry-after-ms": "nan", "retry-after": "Fri, 15 Jan 2027 08:00:30 GMT"}, 30.0, "retry-after"),
        ({"retry-after": "abc", "x-ratelimit-reset-tokens": "6m0s"}, 360.0, "x-ratelimit-reset"),
        ({"retry-after": "0", "x-ratelimit-reset-requests": "2s"}, 2.0, "x-ratelimit-reset"),
        ({"retry-after": "Fri, 15 Jan 2027 08:00:30"}, 60.0, "default"),  # no zone: not a valid HTTP date
        ({"retry-after": "Fri, 15 Jan 9999 08:00:30 GMT"}, 60.0, "default"),  # absurd
        ({"retry-after": "Fri, 32 Foo 2027 25:61:00 GMT"}, 60.0, "default"),
        ({"retry-after-ms": "-5", "x-ratelimit-reset-tokens": "forever"}, 60.0, "default"),
        ({"x-ratelimit-reset-tokens": "0s", "x-ratelimit-remaining-tokens": "0"}, 60.0, "default"),
        ({"x-codex-primary-used-percent": "nan", "x-codex-primary-reset-at": str(int(NOW) + 5000)}, 60.0, "default"),
        ({"x-codex-primary-used-percent": "100", "x-codex-primary-reset-at": "abc"}, 60.0, "default"),
        ({"x-codex-primary-used-percent": "100", "x-codex-primary-reset-at": ""}, 60.0, "default"),
        ({"x-codex-primary-used-percent": "100", "x-codex-primary-reset-after-seconds": "-1"}, 60.0, "default"),
    ],
)
def test_a_bad_hint_falls_through_to_the_next(headers: dict[str, str], seconds: float, source: str) -> None:
    assert limited(headers) == (seconds, source, False)


def test_consecutive_limits_do_not_lengthen_an_announced_reset() -> None:
    assert limited({"retry-after": "2"}, consecutive=5) == (2.0, "retry-after", False)


@pytest.mark.parametrize("code", ["insufficient_quota", "usage_not_included"])
@pytest.mark.parametrize(
    ("headers", "error_fields", "seconds", "source"),
    [
        ({}, {}, DAY, "default"),
        ({"retry-after": "10"}, {}, DAY, "retry-after"),  # a short hint cannot shorten the day
        ({}, {"resets_in_seconds": 3 * DAY}, 3 * DAY, "plan_window"),
        ({}, {"resets_in_seconds": 30 * DAY}, EIGHT_DAYS, "plan_window"),
    ],
)
@pytest.mark.parametrize("status", [429, 200, 403])
def test_quota_and_plan_errors_need_attention_and_block_at_least_a_day(
    code: str, headers: dict[str, str], error_fields: dict[str, float], seconds: float, source: str, status: int
) -> None:
    """F14."""
    verdict = classify(status, headers, ErrorInfo(code=code, **error_fields), NOW)  # type: ignore[arg-type]
    assert verdict == Verdict(
        Kind.LIMITED,
        reason=code,
        until=NOW + seconds,
        source=source,
        attention=True,
        clamped=seconds == EIGHT_DAYS,
    )


@pytest.mark.parametrize(
    ("status", "error", "expected"),
    [
        (200, None, Verdict(Kind.OK)),
        (200, ErrorInfo(), Verdict(Kind.OK)),
        (204, None, Verdict(Kind.OK)),
        (302, None, Verdict(Kind.OK)),
        (401, None, Verdict(Kind.REFUSED, reason="unauthorized")),  # a 401 that does not say why (issue 16)
        (401, ErrorInfo(code="invalid_api_key"), Verdict(Kind.UNAUTHORIZED, reason="invalid_api_key")),
        (400, ErrorInfo(code="invalid_encrypted_content"), Verdict(Kind.BAD_CONTINUATION, "invalid_encrypted_content")),
        (
            404,
            ErrorInfo(code="previous_response_not_found"),
            Verdict(Kind.BAD_CONTINUATION, "previous_response_not_found"),
        ),
        (400, None, Verdict(Kind.ERROR, reason="http_400")),
        (400, ErrorInfo(code="context_length_exceeded"), Verdict(Kind.ERROR, reason="context_length_exceeded")),
        (403, None, Verdict(Kind.ERROR, reason="http_403")),
        (500, None, Verdict(Kind.ERROR, reason="http_500")),
        (503, ErrorInfo(code="server_error"), Verdict(Kind.ERROR, reason="server_error")),
        # A limit code limits whatever the status (a 200 SSE whose first event is response.failed: F15).
        (200, usage_limit(resets_in_seconds=60), Verdict(Kind.LIMITED, "usage_limit_reached", NOW + 60, "plan_window")),
        (
            200,
            ErrorInfo(code="rate_limit_exceeded", message="Please try again in 1.5s."),
            Verdict(Kind.LIMITED, "rate_limit_exceeded", NOW + 1.5, "message"),
        ),
        (400, ErrorInfo(code="rate_limit_exceeded"), Verdict(Kind.LIMITED, "rate_limit_exceeded", NOW + 60, "default")),
        # A 429 is a limit whatever its code.
        (429, ErrorInfo(code="server_error"), Verdict(Kind.LIMITED, "server_error", NOW + 60, "default")),
        (429, ErrorInfo(), Verdict(Kind.LIMITED, "rate_limited", NOW + 60, "default")),
    ],
)
def test_classify_kinds(status: int, error: ErrorInfo | None, expected: Verdict) -> None:
    assert classify(status, {}, error, NOW) == expected


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        # The ChatGPT plan's usage limit: the code is in "type".
        (
            {
                "error": {
                    "type": "usage_limit_reached",
                    "message": "The usage limit has been reached",
                    "plan_type": "plus",
                    "resets_at": 1777936568,
                    "eligible_promo": None,
                    "resets_in_seconds": 13872,
                }
            },
            ErrorInfo("usage_limit_reached", "The usage limit has been reached", 1777936568, 13872),
        ),
        ({"error": {"type": "usage_not_included"}}, ErrorInfo("usage_not_included")),
        # The OpenAI API: the code is in "code", "type" is a category.
        (
            {
                "error": {
                    "code": "rate_limit_exceeded",
                    "type": "requests",
                    "message": "Rate limit reached",
                    "param": None,
                }
            },
            ErrorInfo("rate_limit_exceeded", "Rate limit reached"),
        ),
        ({"error": {"code": "insufficient_quota", "type": "insufficient_quota"}}, ErrorInfo("insufficient_quota")),
        ({"error": {"code": None, "type": "insufficient_quota"}}, ErrorInfo("insufficient_quota")),
        ({"error": {"code": "invalid_api_key", "type": "invalid_request_error"}}, ErrorInfo("invalid_api_key")),
        (
            {"error": {"code": "invalid_encrypted_content", "type": "invalid_request_error"}},
            ErrorInfo("invalid_encrypted_content"),
        ),
        ({"error": {"code": "something_else", "type": "usage_limit_reached"}}, ErrorInfo("usage_limit_reached")),
        ({"error": {"type": "invalid_request_error", "message": "bad"}}, ErrorInfo("", "bad")),
        ({"error": {}}, ErrorInfo()),
        # Wrong types inside the error object never raise.
        ({"error": {"code": 429, "message": 5, "type": None}}, ErrorInfo()),
        ({"error": {"code": ["rate_limit_exceeded"], "type": {"x": 1}}}, ErrorInfo()),
        ({"error": {"code": ["x"], "type": "usage_limit_reached"}}, ErrorInfo("usage_limit_reached")),
        # A Responses stream event: response.failed.
        (
            {
                "type": "response.failed",
                "response": {"id": "r", "error": {"code": "rate_limit_exceeded", "message": "try again in 20ms"}},
            },
            ErrorInfo("rate_limit_exceeded", "try again in 20ms"),
        ),
        (
            {"type": "response.failed", "response": {"error": {"code": "insufficient_quota"}}},
            ErrorInfo("insufficient_quota"),
        ),
        ({"type": "response.failed", "response": {"error": None}}, None),
        ({"type": "response.failed", "response": "oops"}, None),
        ({"type": "response.failed"}, None),
        # A top-level error event (Responses stream, WebSocket frame).
        (
            {"type": "error", "code": "rate_limit_exceeded", "message": "slow down"},
            ErrorInfo("rate_limit_exceeded", "slow down"),
        ),
        (
            {"type": "error", "status_code": 429, "error": {"type": "usage_limit_reached"}},
            ErrorInfo("usage_limit_reached"),
        ),
        ({"type": "error"}, ErrorInfo()),
        ({"code": "usage_limit_reached"}, ErrorInfo("usage_limit_reached")),
        # FastAPI-style {"detail": {...}}.
        ({"detail": {"code": "usage_not_included", "message": "upgrade"}}, ErrorInfo("usage_not_included", "upgrade")),
        (
            {"detail": {"type": "usage_limit_reached", "resets_in_seconds": 60}},
            ErrorInfo("usage_limit_reached", "", None, 60),
        ),
        ({"detail": "Unauthorized"}, None),
        # Not an error at all.
        ({"type": "response.completed", "response": {"error": None}}, None),
        ({"type": "response.output_text.delta", "delta": "hi"}, None),
        ({"error": None}, None),
        ({"error": "a string"}, None),
        ({"error": ["a", "list"]}, None),
        ({}, None),
        (None, None),
        ([], None),
        ([{"error": {"code": "rate_limit_exceeded"}}], None),
        ("rate_limit_exceeded", None),
        (429, None),
        (b'{"error":{}}', None),
    ],
)
def test_error_info_shapes(doc: object, expected: ErrorInfo | None) -> None:
    assert error_info(doc) == expected


@pytest.mark.parametrize(
    ("status", "body", "headers", "expected"),
    [
        (
            429,
            b'{"error":{"type":"usage_limit_reached","message":"The usage limit has been reached",'
            b'"plan_type":"plus","resets_at":1800013872,"eligible_promo":null,"resets_in_seconds":13872}}',
            {"x-codex-primary-used-percent": "100", "x-codex-primary-reset-at": "1800013873"},
            Verdict(Kind.LIMITED, "usage_limit_reached", NOW + 13873, "plan_window"),
        ),
        (
            429,
            b'{"error":{"message":"Rate limit reached for gpt-5 in organization org-x on tokens per min (TPM): '
            b'Limit 30000, Used 30000, Requested 500. Please try again in 1.5s.","type":"tokens",'
            b'"param":null,"code":"rate_limit_exceeded"}}',
            {"retry-after": "2", "retry-after-ms": "1500"},
            Verdict(Kind.LIMITED, "rate_limit_exceeded", NOW + 1.5, "retry-after-ms"),
        ),
        (
            200,
            b'{"type":"response.failed","response":{"error":{"code":"rate_limit_exceeded",'
            b'"message":"Rate limit reached. Please try again in 6m0s."}}}',
            {},
            Verdict(Kind.LIMITED, "rate_limit_exceeded", NOW + 360, "message"),
        ),
        (
            400,
            b'{"error":{"message":"The encrypted content could not be verified.","type":"invalid_request_error",'
            b'"param":null,"code":"invalid_encrypted_content"}}',
            {},
            Verdict(Kind.BAD_CONTINUATION, "invalid_encrypted_content"),
        ),
        (500, b"<html>Internal Server Error</html>", {}, Verdict(Kind.ERROR, "http_500")),
        (429, b"not json", {}, Verdict(Kind.LIMITED, "rate_limited", NOW + 60, "default")),
        # orjson refuses 1e999 (it would be infinite): the body is no JSON, the 429 alone decides.
        (
            429,
            b'{"error": {"type": "usage_limit_reached", "resets_at": 1e999}}',
            {},
            Verdict(Kind.LIMITED, "rate_limited", NOW + 60, "default"),
        ),
    ],
)
def test_real_bodies_through_error_info_and_classify(
    status: int, body: bytes, headers: dict[str, str], expected: Verdict
) -> None:
    assert classify(status, headers, error_info(parse_json(body)), NOW) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2", 2.0),
        (" 2.5\t", 2.5),  # header values may carry whitespace
        (3, 3.0),
        (1.5, 1.5),
        (True, None),  # JSON true is no number
        (False, None),
        (None, None),
        (10**400, None),  # too large for a float
        ("1e999", None),
        ("nan", None),
        ("-inf", None),
        ("", None),
        ("1.5s", None),
        ([1], None),
        ({"a": 1}, None),
    ],
)
def test_a_number_is_a_finite_json_number_or_numeric_string(value: object, expected: float | None) -> None:
    assert _number(value) == expected


# Whose fault is a refusal? (issue 16: refusals the request caused must not condemn the pool) -------------

CODEX_EXPIRED = {
    "error": {
        "message": "Provided authentication token is expired. Please try signing in again.",
        "type": None,
        "code": "token_expired",
        "param": None,
    }
}
RATE_LIMIT_WITHIN = openai_error(
    "Rate limit reached for gpt-4o in organization org-fake on tokens per min (TPM): Limit 30000, Used 29000, "
    "Requested 2000. Please try again in 4s. Visit https://platform.openai.com/account/rate-limits to learn more.",
    "rate_limit_exceeded",
    "tokens",
)


@pytest.mark.parametrize(
    ("status", "doc", "expected"),
    [
        # protocol.md 7: the key itself is invalid -> UNAUTHORIZED (an API key is disabled).
        (401, INCORRECT_API_KEY, Verdict(Kind.UNAUTHORIZED, "invalid_api_key")),
        (401, ACCOUNT_DEACTIVATED, Verdict(Kind.UNAUTHORIZED, "account_deactivated")),
        (401, openai_error("This API key has been revoked.", None), Verdict(Kind.UNAUTHORIZED, "invalid_api_key")),
        (401, openai_error("Invalid API key.", None), Verdict(Kind.UNAUTHORIZED, "invalid_api_key")),
        # protocol.md 13: Anthropic's 401 authentication_error is the key's.
        (
            401,
            {"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}},
            Verdict(Kind.UNAUTHORIZED, "authentication_error"),
        ),
        # Missing scopes or permissions: the request's -> ERROR, passed through, never a disable.
        (
            401,
            {"type": "error", "error": {"type": "permission_error", "message": "not allowed"}},
            Verdict(Kind.ERROR, "permission_error"),
        ),
        (401, MISSING_SCOPES, Verdict(Kind.ERROR, "insufficient_permissions")),
        (
            401,
            openai_error("You don't have permission to use this.", None),
            Verdict(Kind.ERROR, "insufficient_permissions"),
        ),
        (401, openai_error("no", "insufficient_permissions"), Verdict(Kind.ERROR, "insufficient_permissions")),
        # A 401 that does not say why -> REFUSED (an account refreshes; a key is skipped, not condemned).
        (401, CODEX_EXPIRED, Verdict(Kind.REFUSED, "token_expired")),
        (401, {"detail": "Unauthorized"}, Verdict(Kind.REFUSED, "unauthorized")),
        (401, openai_error("Something else entirely.", None), Verdict(Kind.REFUSED, "unauthorized")),
        # protocol.md 7: requested above the limit -> ERROR: no wait helps, the client gets the 429 as it is.
        (429, REQUEST_TOO_LARGE, Verdict(Kind.ERROR, "request_too_large")),
        (
            429,
            openai_error("Request too large for o3 on input tokens per min: Limit 30,000, Requested 50,000.", None),
            Verdict(Kind.ERROR, "request_too_large"),
        ),
        (
            200,
            {"type": "response.failed", "response": {"error": REQUEST_TOO_LARGE["error"]}},
            Verdict(Kind.ERROR, "request_too_large"),
        ),
        # ... but a request within the limit is an ordinary rate limit, blocked until its hint.
        (429, RATE_LIMIT_WITHIN, Verdict(Kind.LIMITED, "rate_limit_exceeded", NOW + 4, "message")),
        # protocol.md 3.1: plan and quota limits are the credential's.
        (
            429,
            {
                "error": {
                    "type": "usage_limit_reached",
                    "message": "The usage limit has been reached",
                    "resets_in_seconds": 600,
                }
            },
            Verdict(Kind.LIMITED, "usage_limit_reached", NOW + 600, "plan_window"),
        ),
        (
            429,
            openai_error("You exceeded your current quota, please check your plan.", "insufficient_quota"),
            Verdict(Kind.LIMITED, "insufficient_quota", NOW + DAY, "default", attention=True),
        ),
    ],
)
def test_refusal_shapes(status: int, doc: object, expected: Verdict) -> None:
    assert classify(status, {}, error_info(doc), NOW) == expected


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("Request too large for gpt-4o on tokens per min (TPM): Limit 30000, Requested 50000.", True),
        ("request too large", True),
        ("Limit 30000, Used 10, Requested 50000. Please try again in 1s.", True),
        ("Limit: 200, Requested: 201", True),
        ("Limit 30000, Used 29000, Requested 2000. Please try again in 4s.", False),
        ("Limit 30000, Requested 30000", False),  # exactly the limit fits once the window resets
        ("Rate limit reached. Please try again in 1.5s.", False),
        ("", False),
    ],
)
def test_request_too_large(message: str, expected: bool) -> None:
    assert request_too_large(message) is expected
