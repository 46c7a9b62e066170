"""The HTTP server: validation with 4xx that say what is wrong, dynamic batching, a bounded
queue (503 + Retry-After), per-request timeouts, health/readiness, Prometheus metrics and a
graceful shutdown. Needs the `serve` extra (fastapi, uvicorn, prometheus-client)."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from edgepipe.errors import EdgepipeError
from edgepipe.runtime.engine import Engine
from edgepipe.runtime.generate import DECODER_KEY
from edgepipe.serve.batcher import DynamicBatcher, Overloaded
from edgepipe.serve.codec import NPY, TextIn, encode_outputs, parse_request

_ARRAY = {"type": "array", "description": "nested list, shaped as the model input (batch first)"}
PREDICT_OPENAPI = {
    "requestBody": {"required": True, "content": {
        "application/json": {"schema": {
            "type": "object",
            "properties": {"inputs": {"type": "object", "additionalProperties": _ARRAY,
                                      "description": "input name -> array (GET /readyz lists names, dtypes, shapes)"},
                           "text": {"description": "instead of inputs, for a classifier whose file carries its "
                                                   "tokenizer: a string or a list of strings"},
                           "text_pair": {"description": "with text: the second text of each pair"}},
        }},
        NPY: {"schema": {"type": "string", "format": "binary",
                         "description": "one .npy array (numpy.save), single-input models only"}},
    }},
    "responses": {
        "200": {"description": "the model's outputs", "content": {
            "application/json": {"schema": {"type": "object", "properties": {
                "outputs": {"type": "object", "additionalProperties": _ARRAY},
                "label": {"type": "string", "description": "text requests: the class name (also id, score)"},
                "labels": {"type": "array", "description": "text requests with a list: one label per text"}}}},
            NPY: {"schema": {"type": "string", "format": "binary",
                             "description": "with Accept: application/x-npy, single-output models"}}}},
        "413": {"description": "body too large"},
        "422": {"description": "inputs that do not fit the model: the error names each problem"},
        "503": {"description": "queue full or shutting down (Retry-After)"},
        "504": {"description": "no result within the timeout"},
    },
}


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class ServingApp:
    """The ASGI application: POST /v1/predict is answered here directly (it is the hot path, and
    FastAPI's routing and middleware cost more per request than a small model's inference);
    every other path, and the lifespan, goes to the FastAPI app in `.fastapi`."""

    def __init__(self, fastapi: FastAPI, predict, api_key: str | None = None):
        self.fastapi, self.state, self._predict = fastapi, fastapi.state, predict
        self._bearer = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self._bearer is not None and scope["path"].startswith("/v1/") \
                and not self._authorized(scope):
            body = _json_error("missing or wrong API key: send the header 'Authorization: Bearer <key>'")
            await send({"type": "http.response.start", "status": 401, "headers": [
                (b"content-type", JSON), (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", b"Bearer")]})
            await send({"type": "http.response.body", "body": body})
            return
        if scope["type"] == "http" and scope["path"] == "/v1/predict" and scope["method"] == "POST":
            await self._predict(scope, receive, send)
        else:
            await self.fastapi(scope, receive, send)

    def _authorized(self, scope) -> bool:
        """The request's Authorization header against the key, in constant time."""
        sent = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        return hmac.compare_digest(sent, self._bearer)


class _Metrics:
    """One app's Prometheus metrics, in its own registry: two apps in one process never share them."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("edgepipe_requests_total", "Requests by HTTP status", ["status"],
                                registry=self.registry)
        self.latency = Histogram("edgepipe_request_seconds", "Request latency", registry=self.registry,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))
        self.batch_sizes = Histogram("edgepipe_batch_size", "Rows per model call", registry=self.registry,
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.depth = Gauge("edgepipe_queue_depth", "Requests waiting", registry=self.registry)
        self.by_status: dict[int, object] = {}

    def count(self, status: int, seconds: float) -> None:
        counter = self.by_status.get(status) or self.by_status.setdefault(status, self.requests.labels(str(status)))
        counter.inc()
        self.latency.observe(seconds)


class _Predict:
    """POST /v1/predict in plain ASGI: the body read within its limit, parsed, merged into a batch
    by this app's batcher, and answered with the status its failure calls for."""

    def __init__(self, engine: Engine, batcher: DynamicBatcher, metrics: _Metrics, state: dict, timeout_s: float,
                 max_body_bytes: int):
        self.engine, self.batcher, self.metrics, self.state = engine, batcher, metrics, state
        self.timeout_s, self.max_body_bytes = timeout_s, max_body_bytes
        self.text = TextIn(engine)

    async def body(self, headers: dict, receive) -> bytes | tuple[int, bytes]:
        """The request body, or (status, error body) when it is over the limit or the client left."""
        limit = self.max_body_bytes
        declared = int(headers.get(b"content-length") or 0)
        if declared > limit:
            return 413, _json_error(f"body of {declared} bytes exceeds the limit of {limit}")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return 499, b""  # the client left; nobody reads this
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return 413, _json_error(f"body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    async def answer(self, headers: dict, receive) -> tuple[int, bytes, bytes, list]:
        """(status, body, media type, extra headers) for one predict request."""
        if not self.state["ready"]:
            return 503, _json_error("shutting down"), JSON, [(b"retry-after", b"1")]
        body = await self.body(headers, receive)
        if isinstance(body, tuple):
            return *body, JSON, []
        try:
            feeds, single = parse_request(self.engine, self.text, body,
                                          headers.get(b"content-type", b"application/json").decode("latin-1"))
            outputs = await self.batcher.submit(feeds)
        except Overloaded as exc:
            return 503, _json_error(str(exc)), JSON, [(b"retry-after", b"1")]
        except asyncio.TimeoutError:
            return 504, _json_error(f"no result within {self.timeout_s} s"), JSON, []
        except EdgepipeError as exc:
            return 422, _json_error(str(exc)), JSON, []
        if single is not None:  # a text request: label names back
            return 200, self.text.labels(outputs, single), JSON, []
        body, media_type = encode_outputs(outputs, headers.get(b"accept", b"").decode("latin-1"))
        return 200, body, NPY_BYTES if media_type == NPY else JSON, []

    async def __call__(self, scope, receive, send):
        started = time.perf_counter()
        status, body, media_type, extra = await self.answer(dict(scope["headers"]), receive)
        if status == 499:
            return
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", media_type), (b"content-length", str(len(body)).encode()), *extra]})
        await send({"type": "http.response.body", "body": body})
        self.metrics.count(status, time.perf_counter() - started)


def create_app(engine: Engine, *, max_batch: int = 32, max_delay_ms: float = 2.0, max_queue: int = 256,
               timeout_s: float = 5.0, max_body_bytes: int = 8 << 20, api_key: str | None = None) -> ServingApp:
    """The server for `engine`. `api_key`: every /v1/ route then needs the header
    `Authorization: Bearer <api_key>` (401 otherwise); /healthz, /readyz and /metrics stay open
    for probes and scrapers."""
    metrics = _Metrics()
    state = {"ready": False}
    batcher = DynamicBatcher(engine, max_batch, max_delay_ms, max_queue, timeout_s,
                             on_batch=metrics.batch_sizes.observe)
    predict = _Predict(engine, batcher, metrics, state, timeout_s, max_body_bytes)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        state["ready"] = True
        yield
        state["ready"] = False  # readiness fails first: load balancers stop sending
        await batcher.stop()

    app = FastAPI(title="edgepipe", lifespan=lifespan)
    app.state.batcher, app.state.engine = batcher, engine

    @app.get("/healthz")
    async def healthz():
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz():
        if not state["ready"]:
            return _error(503, "not ready")
        return {"status": "ready", "model": str(engine.path), "backend": engine.backend, "providers": engine.providers,
                "inputs": [s.to_dict() for s in engine.inputs]} | (
            {"generate": "/v1/generate"} if DECODER_KEY in engine.metadata else {})

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics (text format)",
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics_route():
        metrics.depth.set(batcher.depth)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/predict", summary="Run the model on one request (merged with others into a batch)",
              response_class=Response, openapi_extra=PREDICT_OPENAPI)
    async def predict_route(request: Request):
        # Documents the route (and makes GET answer 405); POSTs are answered by ServingApp itself.
        status, body, media_type, extra = await predict.answer(dict(request.scope["headers"]), request.receive)
        return Response(body, status_code=status, media_type=media_type.decode(),
                        headers={k.decode(): v.decode() for k, v in extra})

    if DECODER_KEY in engine.metadata:
        from edgepipe.runtime.generate import Generator
        from edgepipe.serve.generation import add_generate_route

        add_generate_route(app, Generator(engine), metrics.registry, state, max_queue=max_queue, timeout_s=timeout_s)
    return ServingApp(app, predict, api_key)


JSON = b"application/json"
NPY_BYTES = NPY.encode()


def _json_error(message: str) -> bytes:
    return json.dumps({"error": message}).encode()
