"""The ``credproxy`` command: argv in, exit status out.

Each subcommand parses its arguments, loads the config through the one config path
(:func:`proxy.config.load_config`) and hands values to the modules that do the work.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace

from proxy import __version__, eventloop, logs
from proxy.app import POOL, make_app, serve
from proxy.config import load_config
from proxy.errors import ConfigError, StoreError

log = logging.getLogger("credproxy")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="credproxy", description="Rotate LLM API credentials behind one local URL.")
    parser.add_argument("--version", action="version", version=f"credproxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve_cmd = commands.add_parser("serve", help="run the proxy")
    serve_cmd.add_argument("--config", required=True, help="path to the JSON config file")
    serve_cmd.add_argument("--host", help="listen address (overrides listen.host)")
    serve_cmd.add_argument("--port", type=int, help="listen port (overrides listen.port)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return cmd_serve(args)
    except (ConfigError, StoreError) as exc:
        print(f"credproxy: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 2


def cmd_serve(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    listen = config.listen
    if args.host is not None or args.port is not None:
        listen = replace(
            listen, host=args.host or listen.host, port=args.port if args.port is not None else listen.port
        )
        config = replace(config, listen=listen)
    app = make_app(config)
    logs.configure(config.logging, known=app[POOL].secrets)

    def ready(host: str, port: int) -> None:
        mounts = ", ".join(f"{p.mount} -> {p.upstream}" for p in config.providers)
        log.info("credproxy %s listening on http://%s:%d (%s)", __version__, host, port, mounts)

    eventloop.run(serve(app, listen.host, listen.port, ready))
    return 0
