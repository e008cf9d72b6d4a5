"""Client tokens: made by ``credproxy init``, kept in a private file, read at startup.

The token file holds one token per line (blank lines and ``#`` comments are ignored), so a token can
be rotated by adding the new one, moving the clients, then deleting the old line. A token is
``cpx_`` followed by 43 URL-safe characters from :mod:`secrets` (256 bits); the prefix lets secret
scanners and the log redaction recognise it.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from proxy.config import Security
from proxy.core.guard import TOKEN_HEADER, token_problem
from proxy.core.secret import Secret
from proxy.errors import ConfigError
from proxy.storage.private_files import create_private, read_private

TOKEN_PREFIX = "cpx_"  # noqa: S105 (not a secret)
TOKEN_FILE_NAME = "client-token"  # noqa: S105 (not a secret)
_WHAT = "client token file"


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def parse_token_file(path: Path, raw: bytes) -> tuple[Secret, ...]:
    """The tokens in a token file's bytes; errors name the line, never its content."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigError(path, "", "the client token file must be plain ASCII") from None
    tokens = []
    for number, line in enumerate(text.splitlines(), 1):
        value = line.strip()
        if not value or value.startswith("#"):
            continue
        problem = token_problem(value)
        if problem is not None:
            raise ConfigError(path, f"line {number}", problem)
        tokens.append(Secret(value))
    if not tokens:
        raise ConfigError(path, "", "the client token file holds no token (run `credproxy init` to make one)")
    return tuple(tokens)


def load_client_tokens(security: Security) -> tuple[Secret, ...]:
    """Every configured client token: the inline ones and those of the token file (checked: 0600, ours)."""
    tokens = list(security.client_tokens)
    if security.client_token_file is not None:
        path = security.client_token_file
        raw = read_private(path, _WHAT, missing_hint=f" (create it with: credproxy init --dir {path.parent})")
        tokens.extend(parse_token_file(path, raw))
    return tuple(dict.fromkeys(tokens))


def init_token_file(directory: Path) -> Path:
    """Create ``directory`` (0700) if needed and a new token file in it (0600). Never overwrites."""
    path = directory.resolve() / TOKEN_FILE_NAME  # not the file: resolve() would follow a planted link
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        create_private(path, (new_token() + "\n").encode())
    except FileExistsError:
        raise ConfigError(
            path, "", "already exists; credproxy init never replaces a token (delete the file first to rotate it)"
        ) from None
    except OSError as exc:
        raise ConfigError(path, "", f"cannot create the client token file ({exc.strerror or exc})") from None
    return path


def client_usage(path: Path, base: str = "http://127.0.0.1:8787") -> str:
    """How to turn token checking on and how each client sends the token (printed by ``credproxy init``).

    The URLs follow ``config.example.json`` (mounts ``/openai`` and ``/codex`` on port 8787).
    """
    quoted = str(path).replace('"', '\\"')
    return f"""\
Wrote a new client token to {path} (mode 0600). It is not printed; read it from the file.

1. Turn token checking on in the credproxy config:
     "security": {{"client_token_file": "{quoted}"}}

2. Give the token to clients through an environment variable:
     export CREDPROXY_TOKEN="$(cat {path})"

   OpenAI SDK (Python; the token is sent as Authorization: Bearer):
     OpenAI(base_url="{base}/openai", api_key=os.environ["CREDPROXY_TOKEN"])
   Codex (~/.codex/config.toml):
     model_provider = "credproxy"
     [model_providers.credproxy]
     name = "credproxy"
     base_url = "{base}/codex"
     wire_api = "responses"
     env_key = "CREDPROXY_TOKEN"
   curl:
     curl -H "Authorization: Bearer $CREDPROXY_TOKEN" {base}/openai/models
   Clients that already use Authorization for something else can send {TOKEN_HEADER}: <token> instead.
"""
