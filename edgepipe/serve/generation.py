"""POST /v1/generate for decoders: token ids in, generated token ids out, streamed as server-sent
events (one `data:` line per token, then a summary) or returned whole. Generations run one at a
time in a worker thread (a decode step already uses every core); up to `max_queue` wait, more get
503 + Retry-After; a request that does not get its first token within the timeout gets 504; a
client that disconnects stops its generation at the next token."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Iterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Histogram

from edgepipe.errors import EdgepipeError, InputError
from edgepipe.runtime.generate import Generator, Sampling

GENERATE_OPENAPI = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "required": ["prompt_ids"],
        "properties": {
            "prompt_ids": {"type": "array", "items": {"type": "integer"}},
            "max_new_tokens": {"type": "integer", "default": 32},
            "temperature": {"type": "number", "default": 0.0, "description": "0: greedy"},
            "top_k": {"type": "integer", "default": 0}, "top_p": {"type": "number", "default": 1.0},
            "seed": {"type": "integer", "default": 0},
            "stop_ids": {"type": "array", "items": {"type": "integer"},
                         "description": "default: the model's end-of-sequence tokens"},
            "stream": {"type": "boolean", "default": True,
                       "description": "true: text/event-stream, one event per token"}}}}}},
    "responses": {"200": {"description": "event stream (`data: {\"token\": id, \"index\": i}` per token, then "
                                         "`data: {\"done\": true, ...}`) or JSON {\"tokens\": [...]}"},
                  "422": {"description": "a bad request: the error says what is wrong"},
                  "503": {"description": "too many generations waiting (Retry-After)"},
                  "504": {"description": "no first token within the timeout"}},
}

_FIELDS = {"prompt_ids", "prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop_ids", "stream"}


def parse_request(body: bytes, generator: Generator) -> dict:
    """The generation request as keyword arguments, or InputError naming what is wrong."""
    try:
        data = json.loads(body or b"null")
    except ValueError as exc:
        raise InputError(f"the body is not JSON: {exc}") from None
    if not isinstance(data, dict) or ("prompt_ids" in data) == ("prompt" in data):
        raise InputError('the body must be a JSON object with "prompt_ids": [token ids] or "prompt": "text"')
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise InputError(f"unknown field(s) {', '.join(unknown)}; accepted: {', '.join(sorted(_FIELDS))}")
    if "prompt" in data:
        if not isinstance(data["prompt"], str):
            raise InputError('"prompt" must be a string')
        data["prompt_ids"] = generator.encode(data["prompt"])
    ids = data["prompt_ids"]
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise InputError('"prompt_ids" must be a list of integer token ids')
    stops = data.get("stop_ids")
    if stops is not None and (not isinstance(stops, list) or not all(isinstance(t, int) for t in stops)):
        raise InputError('"stop_ids" must be a list of integer token ids')
    try:
        request = {"prompt": ids, "max_new_tokens": int(data.get("max_new_tokens", 32)),
                   "sampling": Sampling(float(data.get("temperature", 0.0)), int(data.get("top_k", 0)),
                                        float(data.get("top_p", 1.0)), int(data.get("seed", 0))),
                   "stop_ids": stops, "stream": bool(data.get("stream", True)), "text": "prompt" in data}
    except (TypeError, ValueError) as exc:
        raise InputError(f"a sampling field has the wrong type: {exc}") from None
    import numpy as np

    generator.check_prompts(np.asarray([ids], dtype=np.int64).reshape(1, -1), request["max_new_tokens"])
    return request


def add_generate_route(app: FastAPI, generator: Generator, registry: CollectorRegistry, state: dict, *,
                       max_queue: int, timeout_s: float) -> None:
    tokens_total = Counter("edgepipe_generated_tokens_total", "Tokens generated", registry=registry)
    ttft = Histogram("edgepipe_time_to_first_token_seconds", "Prefill: request start to first token",
                     registry=registry, buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
    tpot = Histogram("edgepipe_time_per_output_token_seconds", "Decode step time per token", registry=registry,
                     buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1))
    generations = Counter("edgepipe_generations_total", "Generation requests by HTTP status", ["status"],
                          registry=registry)
    running = threading.Lock()  # one generation at a time: a decode step uses every core
    waiting = {"n": 0}

    def produce(request: dict, queue: asyncio.Queue, loop, cancelled: threading.Event) -> None:
        def put(item):
            loop.call_soon_threadsafe(queue.put_nowait, item)
        with running:
            waiting["n"] -= 1
            if cancelled.is_set():  # timed out while waiting: its client has its 504
                return
            last, first = time.perf_counter(), True
            for event in sse_events(generator, request):
                if event.startswith(_TOKEN_EVENT):
                    now = time.perf_counter()
                    (ttft if first else tpot).observe(now - last)
                    last, first = now, False
                    tokens_total.inc()
                put(event)
                if cancelled.is_set():
                    break
            put(None)

    @app.post("/v1/generate", summary="Generate tokens from a prompt (decoders), streamed as server-sent events",
              openapi_extra=GENERATE_OPENAPI)
    async def generate(http: Request):
        if not state["ready"]:
            return _answer(generations, 503, "shutting down", {"Retry-After": "1"})
        try:
            request = parse_request(await http.body(), generator)
        except EdgepipeError as exc:
            return _answer(generations, 422, str(exc))
        if waiting["n"] >= max_queue:
            return _answer(generations, 503, f"{waiting['n']} generations waiting (limit {max_queue})",
                           {"Retry-After": "1"})
        waiting["n"] += 1
        loop, queue, cancelled = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()
        loop.run_in_executor(None, produce, request, queue, loop, cancelled)
        try:
            first = await asyncio.wait_for(queue.get(), timeout_s)
        except asyncio.TimeoutError:
            cancelled.set()
            return _answer(generations, 504, f"no first token within {timeout_s} s")
        if first.startswith("event: error"):
            return _answer(generations, 422, _data(first)["error"])
        generations.labels("200").inc()
        if not request["stream"]:
            event = first
            while (following := await queue.get()) is not None:
                event = following
            done = _data(event)
            if "error" in done:
                return JSONResponse(done, status_code=500)
            return {k: done[k] for k in ("tokens", "text", "seconds") if k in done}

        async def events():
            event = first
            try:
                while event is not None:
                    yield event
                    event = await queue.get()
            finally:
                cancelled.set()  # a client that left stops the generation at its next token

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


_TOKEN_EVENT = 'data: {"token"'


def _data(event: str) -> dict:
    return json.loads(event.split("data: ", 1)[1])


def _answer(counter: Counter, status: int, message: str, headers: dict | None = None) -> JSONResponse:
    counter.labels(str(status)).inc()
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def sse_events(generator: Generator, request: dict) -> Iterator[str]:
    """The same event stream as /v1/generate, produced synchronously (Ray Serve's replicas
    iterate it in a thread): a `data:` event per token, then the summary, or an error event."""
    started, tokens, shown, first_s = time.perf_counter(), [], "", None
    try:
        for token in generator.stream(request["prompt"], request["max_new_tokens"], sampling=request["sampling"],
                                      stop_ids=request["stop_ids"]):
            first_s = first_s if first_s is not None else time.perf_counter() - started
            tokens.append(token)
            event = {"token": token, "index": len(tokens) - 1}
            if request["text"]:
                text = generator.decode(tokens)
                if not text.endswith("\ufffd") and text.startswith(shown):
                    event["text"], shown = text[len(shown):], text
            yield f"data: {json.dumps(event)}\n\n"
    except Exception as exc:  # noqa: BLE001 - the stream has started: the error is an event
        yield f"event: error\ndata: {json.dumps({'error': str(exc)})}\n\n"
        return
    seconds = time.perf_counter() - started
    rate = (len(tokens) - 1) / (seconds - first_s) if len(tokens) > 1 and seconds > first_s else None
    yield "data: " + json.dumps({"done": True, "tokens": tokens, "ttft_s": round(first_s or 0.0, 4),
                                 **({"text": generator.decode(tokens)} if request["text"] else {}),
                                 "seconds": round(seconds, 4), "tokens_per_s": rate and round(rate, 1)}) + "\n\n"
