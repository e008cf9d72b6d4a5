"""The ``credproxy`` command: argv in, exit status out.

Each subcommand parses its arguments, loads the config through the one config path
(:func:`proxy.config.load_config`) and hands values to the modules that do the work.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import orjson

from proxy import __version__
from proxy.accounts.importer import import_report
from proxy.app import POOL, known_secrets, make_app, serve, unpersisted_report
from proxy.cli import console, demo
from proxy.config import check_listen, is_loopback, load_config
from proxy.edge import eventloop, memory
from proxy.edge.connections import raise_open_file_limit
from proxy.errors import ConfigError, StoreError
from proxy.observe import logs
from proxy.storage.client_tokens import client_usage, init_token_file

log = logging.getLogger("credproxy")

#: ``credproxy serve`` stopped with refreshed tokens it could not write (the accounts need a re-login).
EXIT_UNPERSISTED = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="credproxy", description="Rotate LLM API credentials behind one local URL.")
    parser.add_argument("--version", action="version", version=f"credproxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve_cmd = commands.add_parser("serve", help="run the proxy")
    serve_cmd.add_argument("--config", required=True, help="path to the JSON config file")
    serve_cmd.add_argument("--host", help="listen address (overrides listen.host)")
    serve_cmd.add_argument("--port", type=int, help="listen port (overrides listen.port)")

    import_cmd = commands.add_parser("import", help="add the accounts of a Codex CLI or pi auth.json")
    import_cmd.add_argument("kind", choices=("codex", "pi"), help="the format of the source file")
    import_cmd.add_argument("path", nargs="?", help="source file (default ~/.codex/auth.json or ~/.pi/agent/auth.json)")
    target = import_cmd.add_mutually_exclusive_group(required=True)
    target.add_argument("--config", help="credproxy config: import into its credentials file, for its providers")
    target.add_argument("--credentials", help="the credentials file to import into")

    init_cmd = commands.add_parser("init", help="create a client token file (mode 0600) and show how clients use it")
    init_cmd.add_argument("--dir", default=".", help="folder for the token file 'client-token' (default: current)")

    demo_cmd = commands.add_parser("demo", help="see credproxy at work: a scripted run against a fake upstream")
    demo_cmd.add_argument("--keep-running", action="store_true", help="keep the proxy and the fake upstream up")

    for name, text in (("status", "show every credential of a running proxy"), ("which", "show a session's order")):
        cmd = commands.add_parser(name, help=text)
        where = cmd.add_mutually_exclusive_group()
        where.add_argument("--url", help="the proxy's base URL (default: the config's listen address)")
        where.add_argument("--config", help="the proxy's config file (to find its listen address)")
        cmd.add_argument("--token", help=f"client token, if the proxy requires one (default: ${console.TOKEN_ENV})")
        cmd.add_argument("--json", action="store_true", help="print the proxy's JSON answer")
        if name == "which":
            cmd.add_argument("--session", help="the session id (as in session-id / X-Session-Id); none: round robin")
            cmd.add_argument("--provider", help="provider name (default: every provider that has credentials)")

    check_cmd = commands.add_parser("check", help="validate a config and its credentials file")
    check_cmd.add_argument("--config", required=True, help="path to the JSON config file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            if argv is None:  # the real command line (not a call from Python): may re-execute itself
                use_system_allocator()
            return cmd_serve(args)
        if args.command == "import":
            return cmd_import(args)
        if args.command == "init":
            return cmd_init(args)
        if args.command == "demo":
            return demo.main(keep_running=args.keep_running)
        if args.command in ("status", "which"):
            return cmd_ask(args)
        if args.command == "check":
            ok, report = console.check(args.config)
            print(report, file=sys.stdout if ok else sys.stderr)
            return 0 if ok else 1
    except (ConfigError, StoreError, console.ConsoleError) as exc:
        print(f"credproxy: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `credproxy status | head`: the reader left; say nothing more (Python's documented recipe).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 2


def use_system_allocator() -> None:
    """Re-execute this process (same PID, same command line) with ``PYTHONMALLOC=malloc`` unless the
    environment names an allocator already (see proxy/edge/memory.py); on failure, go on as it is."""
    environ = memory.serve_environment(os.environ)
    if environ is None or not sys.orig_argv:
        return
    try:
        os.execve(sys.executable, sys.orig_argv, environ)  # noqa: S606 (the same command line, re-run)
    except OSError as exc:
        print(f"credproxy: could not switch to the system allocator ({exc}); going on", file=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    listen = config.listen
    if args.host is not None or args.port is not None:
        listen = replace(
            listen, host=args.host or listen.host, port=args.port if args.port is not None else listen.port
        )
        config = replace(config, listen=listen)
        if args.host is not None:
            check_listen(config, flag="--host")
    raise_open_file_limit()
    app = make_app(config)
    logs.configure(config.logging, known=known_secrets(app))

    def ready(host: str, port: int) -> None:
        # What start-up made (modules, config, pool) lives as long as the process: leave it out of every
        # later collection, so that a collection under load scans only what requests create.
        gc.collect()
        gc.freeze()
        mounts = ", ".join(f"{p.mount} -> {p.upstream}" for p in config.providers)
        log.info("credproxy %s listening on http://%s:%d (%s)", __version__, host, port, mounts)
        if not is_loopback(host):
            log.warning("%s is reachable from other machines: every request must carry a client token", host)
        for provider in config.providers:
            if not app[POOL].credentials(provider.name):
                log.warning(
                    "provider %s has no credentials in %s: it answers 503 to every request until some are added "
                    "(the file is re-read when it changes)",
                    provider.name,
                    config.credentials_file,
                )

    eventloop.run(serve(app, listen.host, listen.port, ready))
    report = unpersisted_report(app)
    if report is not None:
        log.critical(report)
        return EXIT_UNPERSISTED
    return 0


IMPORT_SOURCES = {"codex": "~/.codex/auth.json", "pi": "~/.pi/agent/auth.json"}


def cmd_import(args: argparse.Namespace) -> int:
    source = Path(args.path or IMPORT_SOURCES[args.kind]).expanduser()
    providers, kinds = None, None
    if args.config:
        config = load_config(args.config)
        target, providers, kinds = config.credentials_file, [p.name for p in config.providers], config.kinds
    else:
        target = Path(args.credentials).expanduser().resolve()
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    report = import_report(source, args.kind, target, providers, kinds)
    for item in report:
        print(item)
    print(f"credentials file: {target} (unchanged source: {source})")
    if any(item.kind == "oauth" and item.result != "skipped" for item in report):
        print(
            "note: refresh tokens are single-use. Once credproxy refreshes an imported account, the copy in "
            f"{source} stops working: let credproxy own the account, or log the other tool in again."
        )
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    path = init_token_file(Path(args.dir))
    print(client_usage(path))
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    """``status`` and ``which``: ask a running proxy, print its answer."""
    url = console.resolve_url(args.url, args.config)
    token = console.read_token(args.token) or console.token_from_config(args.config)
    if args.command == "status":
        doc = console.get_json(url, "/status", token)
        text = console.render_status(doc, url)
    elif args.provider:
        doc = console.get_json(url, "/which", token, {"session": args.session or "", "provider": args.provider})
        text = console.render_which(doc)
    else:
        docs, empty = console.which_everywhere(url, token, args.session)
        doc = docs[0] if len(docs) == 1 else docs
        text = console.render_which_all(docs, empty)
    print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() if args.json else text)
    return 0
