"""nginx configurations for the benchmark: the canned-JSON upstream, and nginx as a reverse proxy (reference).

Both run in the foreground (``daemon off``) with one worker, every path under the run's folder, so that
the benchmark starts them as ordinary child processes and stops them by PID.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from bench.payloads import JSON_BODY

_COMMON = """
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile %(nofile)d;
pid %(dir)s/nginx-%(name)s.pid;
error_log %(dir)s/nginx-%(name)s.error.log warn;
events { worker_connections %(connections)d; multi_accept on; }
http {
    access_log off;
    client_body_temp_path %(dir)s/tmp-%(name)s-body;
    proxy_temp_path %(dir)s/tmp-%(name)s-proxy;
    fastcgi_temp_path %(dir)s/tmp-%(name)s-fastcgi;
    uwsgi_temp_path %(dir)s/tmp-%(name)s-uwsgi;
    scgi_temp_path %(dir)s/tmp-%(name)s-scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    tcp_nodelay on;
%(body)s
}
"""

_UPSTREAM = """
    server {
        listen 127.0.0.1:%(port)d backlog=4096;
        location / {
            default_type application/json;
            return 200 '%(json)s';
        }
    }
"""

_PROXY = """
    upstream json_upstream { server 127.0.0.1:%(json_port)d; keepalive 1024; }
    upstream sse_upstream { server 127.0.0.1:%(sse_port)d; keepalive 1024; }
    server {
        listen 127.0.0.1:%(port)d backlog=4096;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_buffering off;
        proxy_request_buffering on;
        proxy_read_timeout 600s;
        location /openai/ { proxy_pass http://json_upstream/v1/; }
        location /sse/ { proxy_pass http://sse_upstream/v1/; }
    }
"""


def nginx_binary() -> str | None:
    return shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


def _write(workdir: Path, name: str, body: str, nofile: int) -> Path:
    path = workdir / f"nginx-{name}.conf"
    path.write_text(
        _COMMON % {"dir": workdir, "name": name, "nofile": nofile, "connections": max(1024, nofile - 64), "body": body}
    )
    return path


def upstream_config(workdir: Path, port: int, nofile: int) -> Path:
    """nginx answering every request (any method, body discarded) with the canned JSON."""
    json = JSON_BODY.decode().replace("'", "\\'")
    return _write(workdir, "upstream", _UPSTREAM % {"port": port, "json": json}, nofile)


def proxy_config(workdir: Path, port: int, json_port: int, sse_port: int, nofile: int) -> Path:
    """nginx as a keep-alive reverse proxy with the same mounts as credproxy (/openai, /sse)."""
    return _write(workdir, "proxy", _PROXY % {"port": port, "json_port": json_port, "sse_port": sse_port}, nofile)


def argv(config: Path) -> list[str]:
    binary = nginx_binary()
    assert binary is not None
    return [binary, "-c", str(config), "-p", str(config.parent), "-e", str(config.parent / "nginx-stderr.log")]
