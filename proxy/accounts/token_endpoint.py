"""One call of the OAuth token endpoint: the request Codex sends, the answer sorted, the moment it arrived.

The answer is classified by :func:`proxy.core.oauth.classify_refresh`; network failures are sorted
here, by whether the request may have reached the server: a connection that was never made (refused,
DNS) certainly redeemed nothing; a timeout or a reset after sending may come after a rotation
(*ambiguous*). ``answered`` is the monotonic time the answer was complete, so that the custodian can
measure how long a rotated token lives only in memory before it is on disk.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from proxy.config import Provider
from proxy.core import oauth


@dataclass(frozen=True, slots=True)
class Answer:
    result: oauth.RefreshResult
    answered: float  # time.perf_counter() when the answer was read (or the call failed)


async def redeem(
    session: aiohttp.ClientSession,
    provider: Provider,
    refresh_token: str,
    reason: str,
    now: Callable[[], float],
    within: float,
) -> Answer:
    """Send ``refresh_token`` once (never retried here); the whole call takes at most ``within`` seconds."""
    body = oauth.refresh_body(refresh_token, provider.client_id, reason)
    try:
        async with session.post(
            provider.token_url,
            data=body,
            headers={"Content-Type": "application/json", "Accept": "application/json"},
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=within),
        ) as response:
            payload = await response.read()
            answered = time.perf_counter()
            return Answer(oauth.classify_refresh(response.status, payload, now()), answered)
    except aiohttp.ClientConnectorError as exc:
        # The connection was never made: the request did not leave, nothing was redeemed.
        result = oauth.RefreshResult(oauth.RefreshOutcome.TRANSIENT, code=type(exc).__name__)
    except (aiohttp.ClientError, TimeoutError) as exc:
        result = oauth.RefreshResult(oauth.RefreshOutcome.TRANSIENT, code=type(exc).__name__, ambiguous=True)
    return Answer(result, time.perf_counter())
