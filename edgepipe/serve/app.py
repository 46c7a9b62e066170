"""The HTTP server: validation with 4xx that say what is wrong, dynamic batching, a bounded
queue (503 + Retry-After), per-request timeouts, health/readiness, Prometheus metrics and a
graceful shutdown. Needs the `serve` extra (fastapi, uvicorn, prometheus-client)."""

from __future__ import annotations

import asyncio
import io
import json
import time
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from edgepipe.errors import EdgepipeError, InputError
from edgepipe.runtime.engine import Engine
from edgepipe.serve.batcher import DynamicBatcher, Overloaded

NPY = "application/x-npy"


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def parse_body(engine: Engine, body: bytes, content_type: str) -> dict[str, np.ndarray]:
    """JSON {"inputs": {name: nested list}} (or {name: ...}), cast to the model's dtypes; or a
    raw .npy array for single-input models (dtype must match). Non-finite floats are refused."""
    if content_type.startswith(NPY):
        if len(engine.inputs) != 1:
            raise InputError(f"npy bodies need a single-input model; this one takes "
                             f"{', '.join(s.name for s in engine.inputs)}: send JSON")
        try:
            array = np.load(io.BytesIO(body), allow_pickle=False)
        except Exception:
            raise InputError("body is not a valid .npy array") from None
        feeds = {engine.inputs[0].name: array}
    else:
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InputError("body is not valid JSON (send {\"inputs\": {\"<name>\": [...]}})") from None
        data = data.get("inputs", data) if isinstance(data, dict) else None
        if not isinstance(data, dict):
            raise InputError("JSON body must be an object: {\"inputs\": {\"<name>\": [...]}}")
        feeds = {}
        for spec in engine.inputs:
            if spec.name not in data:
                raise InputError(f"missing input '{spec.name}' (expected {spec.describe()})")
            try:
                feeds[spec.name] = np.asarray(data[spec.name], dtype=spec.np_dtype)
            except (ValueError, TypeError):
                raise InputError(f"input '{spec.name}' is not a rectangular array of {spec.dtype}") from None
        extra = sorted(set(data) - set(feeds))
        if extra:
            raise InputError(f"unknown input(s) {', '.join(extra)}")
    for name, array in feeds.items():
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise InputError(f"input '{name}' contains NaN or infinity")
    engine.validate(feeds)
    return feeds


def create_app(engine: Engine, *, max_batch: int = 32, max_delay_ms: float = 2.0, max_queue: int = 256,
               timeout_s: float = 5.0, max_body_bytes: int = 8 << 20) -> FastAPI:
    registry = CollectorRegistry()
    requests = Counter("edgepipe_requests_total", "Requests by HTTP status", ["status"], registry=registry)
    latency = Histogram("edgepipe_request_seconds", "Request latency", registry=registry,
                        buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))
    batch_sizes = Histogram("edgepipe_batch_size", "Rows per model call", registry=registry,
                            buckets=(1, 2, 4, 8, 16, 32, 64, 128))
    depth = Gauge("edgepipe_queue_depth", "Requests waiting", registry=registry)
    state = {"ready": False}
    batcher = DynamicBatcher(engine, max_batch, max_delay_ms, max_queue, timeout_s, on_batch=batch_sizes.observe)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        state["ready"] = True
        yield
        state["ready"] = False  # readiness fails first: load balancers stop sending
        await batcher.stop()

    app = FastAPI(title="edgepipe", lifespan=lifespan)
    app.state.batcher, app.state.engine = batcher, engine

    @app.post("/v1/predict")
    async def predict(request: Request):
        started = time.perf_counter()
        response = await _predict(request)
        requests.labels(str(response.status_code)).inc()
        latency.observe(time.perf_counter() - started)
        depth.set(batcher.depth)
        return response

    async def _predict(request: Request):
        if not state["ready"]:
            return _error(503, "shutting down", {"Retry-After": "1"})
        size = int(request.headers.get("content-length") or 0)
        if size > max_body_bytes:
            return _error(413, f"body of {size} bytes exceeds the limit of {max_body_bytes}")
        body = await request.body()
        if len(body) > max_body_bytes:
            return _error(413, f"body exceeds the limit of {max_body_bytes} bytes")
        try:
            feeds = parse_body(engine, body, request.headers.get("content-type", "application/json"))
            outputs = await batcher.submit(feeds)
        except Overloaded as exc:
            return _error(503, str(exc), {"Retry-After": "1"})
        except asyncio.TimeoutError:
            return _error(504, f"no result within {timeout_s} s")
        except EdgepipeError as exc:
            return _error(422, str(exc))
        if NPY in request.headers.get("accept", "") and len(outputs) == 1:
            buffer = io.BytesIO()
            np.save(buffer, next(iter(outputs.values())), allow_pickle=False)
            return Response(buffer.getvalue(), media_type=NPY)
        return JSONResponse({"outputs": {k: v.tolist() for k, v in outputs.items()}})

    @app.get("/healthz")
    async def healthz():
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz():
        if not state["ready"]:
            return _error(503, "not ready")
        return {"status": "ready", "model": str(engine.path), "providers": engine.providers,
                "inputs": [s.to_dict() for s in engine.inputs]}

    @app.get("/metrics")
    async def metrics():
        depth.set(batcher.depth)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
