"""The one back-off formula: how long to wait after the n-th failure in a row. Pure.

Every retry schedule of credproxy uses it: a credential limited without a reset hint (60 s, doubling,
at most 30 min), a token refresh that failed transiently, a state write that failed, Redis
reconnects. Exponential without jitter: each schedule belongs to one credential or one task, so
there is no herd of callers to spread out.
"""

from __future__ import annotations


def backoff(failures: int, first: float, cap: float) -> float:
    """``first`` after the first failure, doubling with each further one, never above ``cap``.

    ``failures`` below 1 counts as 1; the exponent is bounded, so a huge count cannot overflow.
    """
    exponent = min(max(failures, 1) - 1, 62)
    return min(first * float(2**exponent), cap)
