"""Dynamic batching over an Engine: concurrent requests merged up to max_batch / max_delay."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np

from edgepipe.errors import EdgepipeError
from edgepipe.runtime.engine import Engine


class Overloaded(EdgepipeError):
    """The request queue is full: answer 503 with Retry-After instead of growing without limit."""


@dataclass
class _Request:
    feeds: dict[str, np.ndarray]
    rows: int
    future: asyncio.Future

    @property
    def signature(self) -> tuple:
        """Requests merge only when every non-batch dim matches (e.g. same sequence length)."""
        return tuple((k, v.shape[1:]) for k, v in sorted(self.feeds.items()))


class DynamicBatcher:
    def __init__(self, engine: Engine, max_batch: int = 32, max_delay_ms: float = 2.0,
                 max_queue: int = 256, timeout_s: float = 5.0, on_batch=None):
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
        request = _Request(feeds, rows, asyncio.get_running_loop().create_future())
        try:
            self.queue.put_nowait(request)
        except asyncio.QueueFull:
            raise Overloaded(f"queue full ({self.queue.maxsize} requests waiting)") from None
        return await asyncio.wait_for(request.future, self.timeout_s)

    async def _next(self, timeout: float | None) -> _Request | None:
        if self._carry is not None:
            request, self._carry = self._carry, None
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
            merged = {k: np.concatenate([r.feeds[k] for r in live]) for k in first.feeds}
            self.on_batch(sum(r.rows for r in live))
            try:
                outputs = await loop.run_in_executor(None, self.engine.run, merged)
            except Exception as exc:  # noqa: BLE001 - every caller of this batch gets the error
                for r in live:
                    if not r.future.done():
                        r.future.set_exception(exc)
                continue
            start = 0
            for r in live:
                part = {k: v[start:start + r.rows] for k, v in outputs.items()}
                start += r.rows
                if not r.future.done():
                    r.future.set_result(part)
