"""Raw-socket HTTP for tests: requests a client library would refuse to send, and clients that misbehave."""

from __future__ import annotations

import asyncio

from tests.conftest import RunningProxy


def address(p: RunningProxy) -> tuple[str, int]:
    host, port = p.url.removeprefix("http://").split(":")
    return host, int(port)


async def raw_exchange(p: RunningProxy, data: bytes) -> bytes:
    """Send raw bytes to the proxy; return its first answer (headers and Content-Length body)."""
    reader, writer = await asyncio.open_connection(*address(p))
    try:
        writer.write(data)
        await writer.drain()
        return await read_answer(reader)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


async def read_answer(reader: asyncio.StreamReader, wait: float = 10) -> bytes:
    """Read one answer (headers and Content-Length body), or what came before the connection closed."""
    answer = b""
    try:
        while not _complete(answer):
            chunk = await asyncio.wait_for(reader.read(65536), wait)
            if not chunk:
                break
            answer += chunk
    except ConnectionResetError:
        pass
    return answer


async def read_answers(reader: asyncio.StreamReader, count: int, wait: float = 10) -> list[bytes]:
    """Read ``count`` answers (each with a Content-Length body) that may arrive in one read."""
    data = b""
    answers: list[bytes] = []
    while len(answers) < count:
        end = _end_of_first(data)
        if end is not None:
            answers.append(data[:end])
            data = data[end:]
            continue
        chunk = await asyncio.wait_for(reader.read(65536), wait)
        if not chunk:
            break
        data += chunk
    return answers


def _end_of_first(data: bytes) -> int | None:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return None
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return len(head) + 4 + length if len(body) >= length else None


def _complete(answer: bytes) -> bool:
    head, sep, body = answer.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return True


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def header_names(answer: bytes) -> list[str]:
    head = answer.partition(b"\r\n\r\n")[0]
    return [line.partition(b":")[0].decode("latin-1").lower() for line in head.split(b"\r\n")[1:]]


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """Everything the server sends until it closes the connection; fails if it stays open longer."""
    data = b""
    async with asyncio.timeout(seconds):
        try:
            while chunk := await reader.read(65536):
                data += chunk
        except ConnectionResetError:
            pass
    return data
