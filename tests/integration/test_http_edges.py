"""Malformed HTTP gets the envelope (issue 18): raw bytes against a real uvicorn server, served
as every service is (:func:`dercmd.web.server_config`)."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
import uvicorn
from fastapi import FastAPI

from dercmd import web
from dercmd.settings import ServiceSettings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _exchange(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
    except ConnectionError:
        pass
    answer = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), 5):
            answer += chunk
    except ConnectionError:
        pass
    writer.close()
    return answer


MALFORMED = {
    "unknown method": b"FROB /health HTTP/1.1\r\nHost: x\r\n\r\n",
    "non-ASCII path": b"GET /v1/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
    "NUL in a header": b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "lying Content-Length": b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}",
    "two Content-Lengths": b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    "not HTTP": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 32 + b"\r\n\r\n",
}


@pytest.fixture
async def port() -> object:
    app = FastAPI()
    web.install_error_envelope(app)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    port = _free_port()
    config = web.server_config("test", app, ServiceSettings(), port)
    config.log_config = None  # the test's logging stays as pytest set it
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    yield port
    server.should_exit = True
    await task


@pytest.mark.parametrize("raw", list(MALFORMED.values()), ids=list(MALFORMED))
async def test_malformed_http_gets_the_envelope(port: int, raw: bytes) -> None:
    answer = await _exchange(port, raw)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert b"content-type: application/json" in head.lower()
    assert json.loads(body) == {"key": "bad_request", "message": "the request is not valid HTTP"}


async def test_a_100_kb_request_line_gets_the_envelope(port: int) -> None:
    answer = await _exchange(port, b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    # the server answers what it parsed: a 404 in the envelope for a path it does not serve
    assert b"content-type: application/json" in head.lower(), answer[:200]
    assert json.loads(body)["key"] in ("bad_request", "not_found")


async def test_a_valid_request_still_works(port: int) -> None:
    answer = await _exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.endswith(b'{"status":"ok"}')
