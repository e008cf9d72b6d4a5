"""What happened to one client request: the record the handler fills and observers (logs, metrics) read."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestRecord:
    """What happened to one client request; handed to observers when it ends. Never holds a secret."""

    request_id: str
    method: str
    path: str
    provider: str = ""
    session_hash: str = ""
    tried: list[str] = field(default_factory=list)
    attempts: int = 0
    status: int = 0
    outcome: str = ""
    error: str = ""
    started: float = 0.0
    duration: float = 0.0
    header_seconds: list[float] = field(default_factory=list)  # per answered attempt: time to response headers


Observer = Callable[[RequestRecord], None]
