"""A small, fast HTTP/1.1 load generator for loopback benchmarks (no dependencies).

Keep-alive connections, each sending its next request when the previous answer arrived
(closed loop, `concurrency` requests in flight). Much cheaper per request than an HTTP client
library, so on a 2-core machine the server, not the client, is what gets measured.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass


@dataclass
class Reply:
    index: int
    status: int
    body: bytes
    seconds: float


async def _connection(host: str, port: int, path: str, bodies: list[tuple[int, bytes]], content_type: str,
                      accept: str, queue: asyncio.Queue, replies: list) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while True:
            try:
                index = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            body = bodies[index][1]
            head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
                    f"Accept: {accept}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
            started = time.perf_counter()
            writer.write(head + body)
            status_line = await reader.readline()
            if not status_line:
                raise ConnectionError("server closed the connection")
            length, close = 0, False
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value)
                elif name == "connection" and value.strip().lower() == "close":
                    close = True
            payload = await reader.readexactly(length)
            replies.append(Reply(index, int(status_line.split()[1]), payload, time.perf_counter() - started))
            if close:
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
    finally:
        writer.close()


async def _run(url: str, bodies: list[bytes], concurrency: int, content_type: str, accept: str):
    assert url.startswith("http://")
    hostport, _, path = url[len("http://"):].partition("/")
    host, _, port = hostport.partition(":")
    queue: asyncio.Queue = asyncio.Queue()
    for index in range(len(bodies)):
        queue.put_nowait(index)
    replies: list[Reply] = []
    indexed = list(enumerate(bodies))
    started = time.perf_counter()
    await asyncio.gather(*(_connection(host, int(port), "/" + path, indexed, content_type, accept, queue, replies)
                           for _ in range(concurrency)))
    return replies, time.perf_counter() - started


def post_all(url: str, bodies: list[bytes], concurrency: int, content_type: str = "application/json",
             accept: str = "application/json") -> tuple[list[Reply], float]:
    """POST every body to `url` with `concurrency` connections; (replies in arrival order, seconds)."""
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    return runner(_run(url, bodies, concurrency, content_type, accept))
