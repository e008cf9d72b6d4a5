"""Pure table tests: Anthropic answers classified, their rate-limit windows read (protocol.md section 13).

``NOW`` is Fri, 15 Jan 2027 08:00:00 GMT, so the RFC 3339 resets in the tables read as offsets from it.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from proxy.core import anthropic
from proxy.core.ratelimits import ErrorInfo, Kind, Verdict, classify, error_info
from proxy.core.replay import Action, action_for
from proxy.core.sse import parse_json, split_first_event
from proxy.core.usage import UsageSnapshot, Window

NOW = 1_800_000_000.0
AT = {0: "2027-01-15T08:00:00Z", 5: "2027-01-15T08:00:05Z", 30: "2027-01-15T08:00:30Z", 60: "2027-01-15T08:01:00Z"}


def error(error_type: str, message: str = "fake") -> bytes:
    """The Messages API's error body, as the API sends it."""
    body = {"type": "error", "error": {"type": error_type, "message": message}, "request_id": "req_011CZ47RMLnx"}
    return orjson.dumps(body)


def windows(**remaining: tuple[int, int, str]) -> dict[str, str]:
    """``anthropic-ratelimit-*`` headers: window name (``_`` for ``-``) -> (limit, remaining, reset)."""
    headers: dict[str, str] = {}
    for name, (limit, left, reset) in remaining.items():
        prefix = f"anthropic-ratelimit-{name.replace('_', '-')}-"
        headers |= {prefix + "limit": str(limit), prefix + "remaining": str(left), prefix + "reset": reset}
    return headers


def verdict(status: int, body: bytes, headers: dict[str, str] | None = None, consecutive: int = 0) -> Verdict:
    """What the proxy decides for one answer: the body through ``error_info``, then ``classify``."""
    return classify(status, headers or {}, error_info(parse_json(body)), NOW, consecutive)


def limited(until: float, source: str, reason: str = "rate_limit_error") -> Verdict:
    return Verdict(Kind.LIMITED, reason, NOW + until, source)


@pytest.mark.parametrize(
    ("status", "body", "headers", "expected"),
    [
        # 429 rate_limit_error: retry-after (always sent by the API) decides.
        (429, error("rate_limit_error"), {"retry-after": "17"}, limited(17, "retry-after")),
        (
            429,
            error("rate_limit_error"),
            {"retry-after": "17", **windows(input_tokens=(80000, 0, AT[60]))},
            limited(17, "retry-after"),
        ),
        # Without it: the earliest reset among the windows with nothing remaining.
        (
            429,
            error("rate_limit_error"),
            windows(requests=(50, 0, AT[30]), tokens=(100000, 0, AT[60]), output_tokens=(20000, 5, AT[5])),
            limited(30, "anthropic-ratelimit-reset"),
        ),
        (
            429,
            error("rate_limit_error"),
            windows(input_tokens=(80000, 0, "2027-01-15T09:00:00.250+01:00")),
            limited(1.0, "anthropic-ratelimit-reset"),  # 0.25 s away: every block lasts at least a second
        ),
        (
            429,
            error("rate_limit_error"),
            windows(input_tokens=(80000, 0, "2027-01-15T08:02:00.500Z")),
            limited(120.5, "anthropic-ratelimit-reset"),
        ),
        # No window is exhausted (the request was bigger than what is left) and no retry-after: the default.
        (429, error("rate_limit_error"), windows(tokens=(100000, 3000, AT[60])), limited(60, "default")),
        # An unreadable reset of the exhausted window is no hint.
        (429, error("rate_limit_error"), windows(tokens=(100000, 0, "in a minute")), limited(60, "default")),
        (429, error("rate_limit_error"), windows(tokens=(100000, 0, "2027-01-15T08:01:00")), limited(60, "default")),
        # 429 whatever the body says.
        (429, b"", {"retry-after": "3"}, limited(3, "retry-after", "rate_limited")),
        # 529 overloaded_error is the service, not the key: never a block (passed to the client).
        (529, error("overloaded_error", "Overloaded"), {"retry-after": "10"}, Verdict(Kind.ERROR, "overloaded_error")),
        (529, b"", {}, Verdict(Kind.ERROR, "http_529")),
        # 401 authentication_error: the key is invalid.
        (
            401,
            error("authentication_error", "invalid x-api-key"),
            {},
            Verdict(Kind.UNAUTHORIZED, "authentication_error"),
        ),
        # Request errors and the rest go to the client untouched.
        (
            400,
            error("invalid_request_error", "messages: field required"),
            {},
            Verdict(Kind.ERROR, "invalid_request_error"),
        ),
        (
            413,
            error("request_too_large", "Request exceeds the maximum size"),
            {},
            Verdict(Kind.ERROR, "request_too_large"),
        ),
        (403, error("permission_error"), {}, Verdict(Kind.ERROR, "permission_error")),
        (404, error("not_found_error"), {}, Verdict(Kind.ERROR, "not_found_error")),
        (500, error("api_error"), {}, Verdict(Kind.ERROR, "api_error")),
        (504, error("timeout_error"), {}, Verdict(Kind.ERROR, "timeout_error")),
        (200, b'{"type":"message","content":[]}', windows(tokens=(100000, 0, AT[60])), Verdict(Kind.OK)),
    ],
)
def test_classify_anthropic_answers(status: int, body: bytes, headers: dict[str, str], expected: Verdict) -> None:
    assert verdict(status, body, headers) == expected


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (402, error("billing_error", "Your organization has a billing problem")),
        # What the API answers in practice when the key's organization has no credit left.
        (
            400,
            error(
                "invalid_request_error",
                "Your credit balance is too low to access the Anthropic API. "
                "Please go to Plans & Billing to upgrade or purchase credits.",
            ),
        ),
    ],
)
def test_a_key_whose_organization_cannot_pay_is_blocked_a_day_and_needs_attention(status: int, body: bytes) -> None:
    got = verdict(status, body)
    assert (got.kind, got.reason, got.attention) == (Kind.LIMITED, "billing_error", True)
    assert got.until == NOW + 86400


@pytest.mark.parametrize(
    ("status", "body", "action"),
    [
        (429, error("rate_limit_error"), Action.BLOCK),
        (529, error("overloaded_error"), Action.PASS),
        (401, error("authentication_error"), Action.DISABLE),
        (400, error("invalid_request_error"), Action.PASS),
        (413, error("request_too_large"), Action.PASS),
        (402, error("billing_error"), Action.BLOCK),
    ],
)
def test_the_action_for_an_api_key(status: int, body: bytes, action: Action) -> None:
    assert action_for(verdict(status, body).kind, "api_key") is action


def sse(*events: tuple[str, dict[str, Any]]) -> bytes:
    return b"".join(f"event: {name}\ndata: ".encode() + orjson.dumps(data) + b"\n\n" for name, data in events)


RATE_LIMIT_EVENT = ("error", {"type": "error", "error": {"type": "rate_limit_error", "message": "Rate limited"}})
OVERLOADED_EVENT = ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
MESSAGE_START = ("message_start", {"type": "message_start", "message": {"id": "msg_1", "type": "message"}})


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        # A 200 stream whose first event is a rate-limit error is a limit (the handler peeks at it first).
        (sse(RATE_LIMIT_EVENT), ErrorInfo(code="rate_limit_error", message="Rate limited")),
        (b": keep-alive\n\n" + sse(RATE_LIMIT_EVENT), ErrorInfo(code="rate_limit_error", message="Rate limited")),
        # Overloaded in the first event is the service's trouble: not a limit.
        (sse(OVERLOADED_EVENT), ErrorInfo(code="overloaded_error", message="Overloaded")),
        (sse(MESSAGE_START, RATE_LIMIT_EVENT), None),
    ],
)
def test_the_first_event_of_a_stream(stream: bytes, expected: ErrorInfo | None) -> None:
    first = split_first_event(stream)
    assert first is not None
    assert error_info(parse_json(first)) == expected


@pytest.mark.parametrize(
    ("doc", "code"),
    [
        (
            {
                "type": "error",
                "status": 400,
                "error": {"type": "invalid_request_error", "code": "invalid_encrypted_content"},
            },
            "invalid_encrypted_content",
        ),
        (
            {"type": "error", "status": 429, "error": {"type": "usage_limit_reached", "resets_at": 1}},
            "usage_limit_reached",
        ),
    ],
)
def test_openai_error_frames_keep_their_codes(doc: dict[str, Any], code: str) -> None:
    info = error_info(doc)
    assert info is not None
    assert info.code == code


def test_a_first_event_rate_limit_blocks_until_the_default_or_the_headers() -> None:
    first = split_first_event(sse(RATE_LIMIT_EVENT))
    assert first is not None
    info = error_info(parse_json(first))
    assert classify(200, {}, info, NOW) == limited(60, "default")
    headers = windows(requests=(50, 0, AT[30]))
    assert classify(200, headers, info, NOW) == limited(30, "anthropic-ratelimit-reset")


@pytest.mark.parametrize(
    ("doc", "code"),
    [
        ({"type": "error", "error": {"type": "rate_limit_error", "message": "x"}}, "rate_limit_error"),
        ({"type": "error", "error": {"type": "overloaded_error"}}, "overloaded_error"),
        # Not the Anthropic shape: no top-level type, an unknown error type, or not an error at all.
        ({"error": {"type": "rate_limit_error"}}, None),
        ({"type": "error", "error": {"type": "something_new"}}, None),
        ({"type": "error", "error": "rate_limit_error"}, None),
        ({"type": "message_start", "message": {}}, None),
        (
            {"type": "error", "error": {"type": "invalid_request_error", "message": "credit balance is too low"}},
            "billing_error",
        ),
        ({"type": "error", "error": {"type": "invalid_request_error", "message": 5}}, "invalid_request_error"),
        # OpenAI's error frames share the envelope; their ``code`` says they are not Anthropic's.
        ({"type": "error", "error": {"type": "invalid_request_error", "code": "invalid_encrypted_content"}}, None),
        ({"type": "error", "status": 429, "error": {"type": "usage_limit_reached", "resets_at": 1}}, None),
    ],
)
def test_error_code(doc: dict[str, Any], code: str | None) -> None:
    assert anthropic.error_code(doc) == code


@pytest.mark.parametrize(
    ("value", "epoch"),
    [
        ("2027-01-15T08:00:30Z", NOW + 30),
        ("2027-01-15T08:00:30.5Z", NOW + 30.5),
        ("2027-01-15T09:00:30+01:00", NOW + 30),
        (" 2027-01-15T08:00:30Z ", NOW + 30),
        ("2027-01-15T08:00:30", None),  # no offset: not RFC 3339
        ("", None),
        (None, None),
        ("tomorrow", None),
        ("1800000030", None),
        ("2027-01-15T08:00:30Z" * 5, None),
    ],
)
def test_parse_reset(value: str | None, epoch: float | None) -> None:
    assert anthropic.parse_reset(value) == epoch


def test_usage_from_the_headers_of_an_answer() -> None:
    headers = windows(
        requests=(50, 49, AT[5]),
        tokens=(100000, 0, AT[60]),
        input_tokens=(80000, 79999, AT[30]),
        output_tokens=(20000, 19900, "garbage"),
    )
    assert anthropic.usage_from_headers(headers, NOW) == UsageSnapshot(
        (
            Window("requests", 2.0, None, NOW + 5),
            Window("tokens", 100.0, None, NOW + 60),
            Window("input-tokens", 0.0, None, NOW + 30),  # 0.00125 % rounds down
            Window("output-tokens", 0.5, None, None),
        ),
        NOW,
        "headers",
    )


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"x-ratelimit-remaining-tokens": "0"},
        windows(tokens=(0, 0, AT[60])),  # a zero limit says nothing
        {"anthropic-ratelimit-tokens-limit": "100", "anthropic-ratelimit-tokens-reset": AT[60]},
        {"anthropic-ratelimit-tokens-limit": "nan", "anthropic-ratelimit-tokens-remaining": "3"},
        {"anthropic-ratelimit-tokens-limit": "100", "anthropic-ratelimit-tokens-remaining": "-3"},
    ],
)
def test_headers_without_a_usable_window(headers: dict[str, str]) -> None:
    assert anthropic.usage_from_headers(headers, NOW) is None


def test_one_token_left_is_not_exhausted() -> None:
    snapshot = anthropic.usage_from_headers(windows(tokens=(1_000_000, 1, AT[60])), NOW)
    assert snapshot is not None
    assert snapshot.windows[0].used_percent == 99.99
    assert anthropic.exhausted_until(snapshot, NOW) is None


@pytest.mark.parametrize(
    ("headers", "until"),
    [
        (windows(requests=(50, 49, AT[5]), tokens=(100000, 500, AT[60])), None),
        (windows(requests=(50, 0, AT[30]), tokens=(100000, 500, AT[60])), NOW + 30),
        # Several exhausted: the earliest reset (token buckets refill continuously).
        (windows(requests=(50, 0, AT[30]), tokens=(100000, 0, AT[60]), output_tokens=(9, 0, AT[5])), NOW + 5),
        # An exhausted window whose reset is past or unreadable blocks nothing.
        (windows(requests=(50, 0, AT[0])), None),
        (windows(requests=(50, 0, "soon")), None),
        (windows(requests=(50, 0, "soon"), tokens=(100000, 0, AT[60])), NOW + 60),
    ],
)
def test_exhausted_until(headers: dict[str, str], until: float | None) -> None:
    snapshot = anthropic.usage_from_headers(headers, NOW)
    assert snapshot is not None
    assert anthropic.exhausted_until(snapshot, NOW) == until


def test_the_error_document_credproxy_answers_with() -> None:
    assert anthropic.error_document("rate_limit_error", "every credential is rate limited") == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "every credential is rate limited"},
    }


@pytest.mark.parametrize(
    ("wait", "status", "error_type", "headers"),
    [
        (1, 429, "rate_limit_error", {"Retry-After": "1"}),
        (60, 429, "rate_limit_error", {"Retry-After": "60"}),  # Claude Code and the SDK wait, then retry
        (61, 429, "rate_limit_error", {"Retry-After": "61", "x-should-retry": "false"}),
        (86400, 429, "rate_limit_error", {"Retry-After": "86400", "x-should-retry": "false"}),
        (None, 503, "api_error", {"x-should-retry": "false"}),  # nothing comes back on its own
    ],
)
def test_the_answer_when_no_key_can_serve(
    wait: int | None, status: int, error_type: str, headers: dict[str, str]
) -> None:
    got_status, doc, got_headers = anthropic.unavailable("every credential of provider 'anthropic' is ...", wait)
    assert (got_status, doc["error"]["type"], got_headers) == (status, error_type, headers)
    assert doc["type"] == "error"
    assert doc["error"]["message"].endswith(f"retry in {wait} s" if wait else "...")


@pytest.mark.parametrize(
    ("raw", "refused"),
    [
        ({"type": "api_key", "key": "sk-ant-api03-abc"}, False),
        ({"type": "api_key", "key": "anything-else"}, False),
        ({"type": "api_key", "key": "sk-ant-oat01-abc"}, True),
        ({"type": "oauth", "access": "sk-ant-oat01-abc", "refresh": "sk-ant-ort01-abc", "expires": 1}, True),
        ({"type": "oauth"}, True),
    ],
)
def test_subscription_problem(raw: dict[str, Any], refused: bool) -> None:
    problem = anthropic.subscription_problem(raw)
    assert (problem is not None) is refused
    if problem is not None:
        assert "sk-ant-oat01-abc" not in problem
