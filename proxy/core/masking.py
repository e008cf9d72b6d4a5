"""What goes back to a client holds no secret of ours: relayed heads and buffered error bodies. Pure.

An upstream may reflect what it was sent: a header ``X-Echo-Authorization: Bearer sk-...``, or
"Incorrect API key provided: sk-..." in an error body. A client of credproxy must never hold a real
credential, so before an answer is relayed its header values and reason phrase are masked for every
secret the process holds (the log filter's ``known_secrets``: the pool's tokens as they rotate, the
client tokens, the Redis password) and for the key and bearer shapes
(:data:`~proxy.core.secret.HEADER_SHAPES`), and a buffered error body for those and the JWT
shape too (:func:`~proxy.core.secret.redact_bytes`), its ``Content-Length`` made right.

What is relayed as it comes: a committed stream (the body of a ``200``, and whatever of an error body
lies beyond the bytes buffered to classify it): masking it would hold back or split its chunks, and
bytes already sent cannot be taken back. A compressed error body (``Content-Encoding``), which the
proxy does not read either.

Cost: every response's head is checked, so the check is cheap. No header value can hold a secret
longer than itself: the known secrets are looked for only when a value is at least as long as the
shortest of them (real keys and tokens are longer than most header values), and the shapes only when
the values hold one of their first letters (``sk``, ``cpx``, ``earer`` or ``EARER``: a bearer value
spelled in mixed case is masked only when it is a known secret). A typical head costs about a
microsecond; bodies are touched only when they were buffered anyway.
"""

from __future__ import annotations

from collections.abc import Sequence

from proxy.core.headers import Headers
from proxy.core.secret import HEADER_SHAPES, KnownSecrets, redact_bytes, redact_each

_IDENTITY = frozenset({"", "identity"})


def mask_head(headers: Headers, reason: str, known: Sequence[str]) -> tuple[Headers, str]:
    """``headers`` and the reason phrase with every secret masked (the same list when nothing was)."""
    values = [value for _, value in headers]
    values.append(reason)
    shortest = known.shortest if isinstance(known, KnownSecrets) else KnownSecrets(known).shortest
    secrets = known if max(map(len, values)) >= shortest else ()
    if not secrets and not HEADER_SHAPES.may_match("\x00".join(values)):
        return headers, reason
    clean = redact_each(values, secrets, HEADER_SHAPES)
    if clean is values:
        return headers, reason
    return [(name, value) for (name, _), value in zip(headers, clean, strict=False)], clean[-1]


def mask_body(headers: Headers, body: bytes, complete: bool, known: Sequence[str]) -> tuple[Headers, bytes]:
    """A buffered body and its headers with every secret in the body masked.

    ``complete``: ``body`` is the whole body. Then ``Content-Length`` follows the masked length;
    otherwise it is dropped (the rest follows as it comes, and the client gets the body chunked).
    """
    for name, value in headers:
        if name.lower() == "content-encoding" and value.strip().lower() not in _IDENTITY:
            return headers, body
    clean = redact_bytes(body, known)
    if clean is body:
        return headers, body
    kept = [(name, value) for name, value in headers if name.lower() != "content-length"]
    if complete:
        kept.append(("Content-Length", str(len(clean))))
    return kept, clean
