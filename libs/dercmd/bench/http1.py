"""A lean HTTP/1.1 client for the benchmark's REST load: kept-alive connections, one request
in flight on each, requests written as prepared bytes and answers parsed by ``httptools``
(uvicorn's C parser, already a dependency).

Why not aiohttp: on the shared 2 cores the load generator competes with the stack it
measures, and aiohttp spent 0.23 s of CPU per 1,000 POSTs (its request building, cookie jar,
header multidicts and response objects), more than arbitration. This client spends what
writing bytes and parsing a status line costs, as wrk or hey would; it is for the benchmark
only and knows just what the benchmark sends (no redirects, no chunked requests, no TLS).
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

import httptools


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._answer: asyncio.Future[tuple[int, bytes]] | None = None
        self._body: list[bytes] = []
        self.lost = False
        self.last_used = 0.0

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail(ConnectionResetError("the server closed the connection"))

    # httptools callbacks
    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_result((self._parser.get_status_code(), b"".join(self._body)))

    def _fail(self, exc: Exception) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(exc)

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        assert self._transport is not None
        self._body = []
        self._answer = asyncio.get_running_loop().create_future()
        self._transport.write(raw)
        try:
            return await self._answer
        finally:
            self.last_used = asyncio.get_running_loop().time()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class Client:
    """``concurrency`` kept-alive connections to one server; a request waits for a free one.
    A connection idle for longer than the server keeps it (uvicorn: 5 s) is opened anew
    before use, so a pause between phases does not turn into errors."""

    IDLE_S = 3.0

    def __init__(self, base_url: str, concurrency: int, headers: dict[str, str]) -> None:
        url = urlsplit(base_url)
        self._host, self._port = url.hostname or "127.0.0.1", url.port or 80
        self._prefix = url.path.rstrip("/")
        self._head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": url.netloc, **headers}.items())
        self._idle: asyncio.LifoQueue[_Connection | None] = asyncio.LifoQueue()
        for _ in range(concurrency):
            self._idle.put_nowait(None)  # a connection not yet opened
        self._open: set[_Connection] = set()

    async def post_json(self, path: str, body: bytes, timeout_s: float) -> tuple[int, bytes, float]:
        """(status, body, when the request was written: ``time.time()`` once it had its
        connection, so time spent waiting for one is the client's, not the server's)."""
        raw = (f"POST {self._prefix}{path} HTTP/1.1\r\n{self._head}Content-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        conn = await self._idle.get()
        loop = asyncio.get_running_loop()
        try:
            if conn is not None and (conn.lost or loop.time() - conn.last_used > self.IDLE_S):
                self._drop(conn)
                conn = None
            if conn is None:
                _, conn = await loop.create_connection(_Connection, self._host, self._port)
                self._open.add(conn)
            started = time.time()
            async with asyncio.timeout(timeout_s):
                status, answer = await conn.request(raw)
            return status, answer, started
        except BaseException:
            if conn is not None:
                self._drop(conn)  # its answer may still come: never reuse it
            conn = None
            raise
        finally:
            self._idle.put_nowait(conn)

    def _drop(self, conn: _Connection) -> None:
        conn.close()
        self._open.discard(conn)

    def close(self) -> None:
        for conn in list(self._open):
            self._drop(conn)
