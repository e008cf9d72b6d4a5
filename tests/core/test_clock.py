"""Times as a person reads them in a log line."""

from __future__ import annotations

import re
from datetime import datetime

from proxy.core.clock import readable_until


def test_a_moment_is_iso_8601_local_time_with_its_offset_and_the_seconds_left() -> None:
    now = 1_796_379_304.0
    text = readable_until(now + 3600.4, now)
    stamp, _, left = text.partition(", in ")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", stamp)
    assert datetime.fromisoformat(stamp).timestamp() == now + 3600
    assert left == "3600 s"
    assert readable_until(now - 5, now).endswith(", in 0 s")
    assert "1796379304" not in text
