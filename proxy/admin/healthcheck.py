"""``python -m proxy.admin.healthcheck --config PATH``: exit 0 when the proxy of that config answers its health check.

The container's ``HEALTHCHECK`` (python:slim has no curl). Standard library only for the request,
with environment proxies off, and a short timeout; the address comes from the same config file the
server reads (``0.0.0.0`` is asked on ``127.0.0.1``).

A proxy that serves but is degraded (state not persisted, Redis unavailable...) is still healthy
for the container (a restart would fix none of it and lose tokens held only in memory): exit 0, and
what is degraded is printed, so ``docker inspect`` shows it in the health log.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

from proxy.cli.console import base_url
from proxy.config import ADMIN_PREFIX, load_config
from proxy.errors import ConfigError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy.admin.healthcheck")
    parser.add_argument("--config", required=True)
    parser.add_argument("--timeout", type=float, default=4.0)
    args = parser.parse_args(argv)
    try:
        url = base_url(load_config(args.config)) + f"{ADMIN_PREFIX}/health"
    except ConfigError as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=args.timeout) as response:
            ok = response.status == 200
            body = response.read(65536)
    except (urllib.error.URLError, OSError) as exc:
        print(f"unhealthy: {url}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        return 1
    degraded = _degraded(body)
    if ok and degraded:
        print(f"serving, degraded: {', '.join(degraded)} (see credproxy status)")
    return 0 if ok else 1


def _degraded(body: bytes) -> list[str]:
    try:
        doc = json.loads(body)
    except ValueError:
        return []
    found = doc.get("degraded") if isinstance(doc, dict) else None
    return [str(item) for item in found] if isinstance(found, list) else []


if __name__ == "__main__":
    sys.exit(main())
