"""Pure table tests: the one back-off formula."""

from __future__ import annotations

import pytest

from proxy.core.backoff import backoff


@pytest.mark.parametrize(
    ("failures", "first", "cap", "expected"),
    [
        (1, 30.0, 900.0, 30.0),
        (2, 30.0, 900.0, 60.0),
        (5, 30.0, 900.0, 480.0),
        (6, 30.0, 900.0, 900.0),  # 960 capped
        (0, 1.0, 60.0, 1.0),  # no failure yet counts as the first
        (-3, 1.0, 60.0, 1.0),
        (10_000, 1.0, 60.0, 60.0),  # no overflow
        (3, 0.25, 10.0, 1.0),
    ],
)
def test_backoff(failures: int, first: float, cap: float, expected: float) -> None:
    assert backoff(failures, first, cap) == expected
