"""Dynamic batching over an Engine: concurrent requests merged up to max_batch / max_delay."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np

from edgepipe.errors import ConfigError, EdgepipeError, InputError
from edgepipe.runtime.engine import Engine


class Overloaded(EdgepipeError):
    """The request queue is full: answer 503 with Retry-After instead of growing without limit."""


@dataclass
class _Request:
    feeds: dict[str, np.ndarray]
    rows: int
    future: asyncio.Future
    signature: tuple = ()


def signature(feeds: dict[str, np.ndarray]) -> tuple:
    """Requests merge only when every non-batch dim matches (e.g. same sequence length)."""
    return tuple((k, v.shape[1:]) for k, v in sorted(feeds.items()))


def run_isolated(engine: Engine, requests: list[dict[str, np.ndarray]]) -> list:
    """Run mergeable requests (same signature) as one model call and split the outputs back, in
    request order. When the call fails, the requests are split in halves and each half retried, so
    only the requests that fail alone get an error (their exception) and their neighbours their
    outputs: one bad request never fails the batch it was merged into."""
    if len(requests) == 1:
        merged = requests[0]
    else:
        merged = {k: np.concatenate([r[k] for r in requests]) for k in requests[0]}
    try:
        outputs = engine.run(merged)
    except Exception as exc:  # noqa: BLE001 - handed to its caller, or narrowed down by splitting
        if len(requests) == 1:
            return [exc]
        half = len(requests) // 2
        return run_isolated(engine, requests[:half]) + run_isolated(engine, requests[half:])
    results, start = [], 0
    for feeds in requests:
        rows = len(next(iter(feeds.values())))
        results.append({k: v[start:start + rows] for k, v in outputs.items()})
        start += rows
    return results


def run_merged(engine: Engine, requests: list[dict[str, np.ndarray]]) -> list:
    """Run many requests as few model calls: one per group of mergeable requests, results (or
    each failing request's own exception) in request order."""
    groups: dict[tuple, list[int]] = {}
    for index, feeds in enumerate(requests):
        groups.setdefault(signature(feeds), []).append(index)
    results: list = [None] * len(requests)
    for members in groups.values():
        for i, result in zip(members, run_isolated(engine, [requests[i] for i in members])):
            results[i] = result
    return results


def _expire(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(asyncio.TimeoutError())


def check_limits(max_batch: int, max_delay_ms: float, max_queue: int, timeout_s: float) -> None:
    """Refuse serving limits no request could pass (max batch 0 answers every request with 422)."""
    problems = [f"{name} must be {rule}, got {value:g}" for name, value, ok, rule in (
        ("max batch", max_batch, max_batch >= 1, ">= 1"), ("max delay (ms)", max_delay_ms, max_delay_ms >= 0, ">= 0"),
        ("max queue", max_queue, max_queue >= 1, ">= 1"), ("timeout (s)", timeout_s, timeout_s > 0, "> 0")) if not ok]
    if problems:
        raise ConfigError("; ".join(problems))


def ensure_port_free(host: str, port: int) -> None:
    """Bind (host, port) once before loading anything: a port in use is one clear line."""
    import socket

    if not 1 <= port <= 65535:
        raise ConfigError(f"port must be 1..65535, got {port}")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; "
                         "choose another --port (or --host)") from None


class DynamicBatcher:
    def __init__(self, engine: Engine, max_batch: int = 32, max_delay_ms: float = 2.0,
                 max_queue: int = 256, timeout_s: float = 5.0, on_batch=None):
        check_limits(max_batch, max_delay_ms, max_queue, timeout_s)
        self.engine, self.max_batch, self.max_delay = engine, max_batch, max_delay_ms / 1000
        self.timeout_s, self.on_batch = timeout_s, on_batch or (lambda size: None)
        self.queue: asyncio.Queue[_Request] = asyncio.Queue(maxsize=max_queue)
        self._carry: _Request | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._worker())

    async def stop(self, drain_s: float = 10.0) -> None:
        """Finish what is queued (bounded wait), then stop."""
        deadline = asyncio.get_running_loop().time() + drain_s
        while (not self.queue.empty() or self._carry) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        if self._task:
            self._task.cancel()

    @property
    def depth(self) -> int:
        return self.queue.qsize() + (self._carry is not None)

    async def submit(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = len(next(iter(feeds.values())))
        if rows > self.max_batch:
            raise EdgepipeError(f"request has {rows} rows, more than max batch {self.max_batch}")
        loop = asyncio.get_running_loop()
        request = _Request(feeds, rows, loop.create_future(), signature(feeds))
        try:
            self.queue.put_nowait(request)
        except asyncio.QueueFull:
            raise Overloaded(f"queue full ({self.queue.maxsize} requests waiting)") from None
        # One timer per request (cheaper than asyncio.wait_for's task on the hot path).
        timer = loop.call_later(self.timeout_s, _expire, request.future)
        try:
            return await request.future
        finally:
            timer.cancel()

    def _take(self) -> _Request | None:
        """The carried-over request, or the next queued one if there is one right now."""
        if self._carry is not None:
            request, self._carry = self._carry, None
            return request
        try:
            return self.queue.get_nowait()
        except asyncio.QueueEmpty:
            return None

    async def _next(self, timeout: float | None) -> _Request | None:
        request = self._take()
        if request is not None:
            return request
        try:
            return await (asyncio.wait_for(self.queue.get(), timeout) if timeout is not None else self.queue.get())
        except asyncio.TimeoutError:
            return None

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next(None)
            batch, rows = [first], first.rows
            deadline = loop.time() + self.max_delay
            while rows < self.max_batch:
                nxt = self._take()  # under load the queue holds the batch already: no waiting
                if nxt is None:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    nxt = await self._next(remaining)
                    if nxt is None:
                        break
                if nxt.signature != first.signature or rows + nxt.rows > self.max_batch:
                    self._carry = nxt  # starts the next batch
                    break
                batch.append(nxt)
                rows += nxt.rows
            live = [r for r in batch if not r.future.done()]  # timed-out callers are gone
            if not live:
                continue
            self.on_batch(sum(r.rows for r in live))
            results = await loop.run_in_executor(None, run_isolated, self.engine, [r.feeds for r in live])
            for r, result in zip(live, results):
                if r.future.done():
                    continue
                if isinstance(result, BaseException):
                    r.future.set_exception(result)
                else:
                    r.future.set_result(result)
