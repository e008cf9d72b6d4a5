"""Pure tests: compressed error bodies are read for classification, within bounds."""

from __future__ import annotations

import gzip
import zlib

import pytest

from proxy.core.encoding import readable

BODY = b'{"type":"error","error":{"type":"invalid_request_error","message":"Your credit balance is too low"}}'


def deflate_raw(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


@pytest.mark.parametrize(
    ("body", "encoding"),
    [
        (BODY, None),
        (BODY, ""),
        (BODY, "identity"),
        (gzip.compress(BODY, mtime=0), "gzip"),
        (gzip.compress(BODY, mtime=0), " GZIP "),
        (gzip.compress(BODY, mtime=0), "x-gzip"),
        (zlib.compress(BODY), "deflate"),
        (deflate_raw(BODY), "deflate"),  # raw deflate, as some servers send it
    ],
)
def test_readable_bodies(body: bytes, encoding: str | None) -> None:
    assert readable(body, encoding) == BODY


@pytest.mark.parametrize(
    ("body", "encoding"),
    [
        (BODY, "br"),
        (BODY, "zstd"),
        (BODY, "gzip, br"),  # stacked encodings are not undone
        (b"not gzip at all", "gzip"),
        (gzip.compress(BODY, mtime=0)[:20], "gzip"),  # truncated: whatever came out is not trusted as whole
        (b"\x00\x01garbage", "deflate"),
    ],
)
def test_unreadable_bodies(body: bytes, encoding: str) -> None:
    assert readable(body, encoding) is None


def test_a_decompression_bomb_is_not_inflated() -> None:
    bomb = gzip.compress(b"\x00" * (5 * 1024 * 1024))
    assert len(bomb) < 10_000
    assert readable(bomb, "gzip", cap=1024 * 1024) is None
