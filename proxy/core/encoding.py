"""Reading a compressed error body, to classify it; what the client gets is never changed.

Clients ask for compressed answers (Claude Code sends ``Accept-Encoding: gzip, deflate, br, zstd``)
and credproxy passes bodies through as they come, ``Content-Encoding`` included. An error body is
read before deciding what to do, and its JSON says which limit it is (``insufficient_quota``,
``billing_error``, "credit balance is too low"...), so a gzip or deflate body is inflated for that
reading alone, bounded against decompression bombs. Other encodings (``br``, ``zstd``) are left
as they are: the answer is then classified by its status and headers, which carry the limit and
its reset in every case that matters.
"""

from __future__ import annotations

import zlib

#: What an inflated error body may grow to; beyond it, classification goes without the body.
MAX_INFLATED = 1024 * 1024


def readable(body: bytes, content_encoding: str | None, cap: int = MAX_INFLATED) -> bytes | None:
    """``body`` decoded for reading, or ``None`` when it cannot be (unknown encoding, corrupt, too big)."""
    encoding = (content_encoding or "").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding in ("gzip", "x-gzip"):
        wbits = 16 + zlib.MAX_WBITS
    elif encoding == "deflate":
        wbits = zlib.MAX_WBITS  # zlib-wrapped, as RFC 9110 defines it; raw deflate is tried below
    else:
        return None
    for bits in (wbits, -zlib.MAX_WBITS) if encoding == "deflate" else (wbits,):
        inflater = zlib.decompressobj(bits)
        try:
            data = inflater.decompress(body, cap)
        except zlib.error:
            continue
        if inflater.unconsumed_tail or not inflater.eof:
            return None  # more than ``cap`` bytes, or a stream cut short
        return data
    return None
