"""Scale out on Ray Serve: the Engine as a Serve deployment with replicas or autoscaling,
Serve's own dynamic batching and back-pressure (503 + Retry-After), and the same request
format and 4xx errors as `edgepipe serve`. Needs the `ray` extra (`ray[serve]`).

    app = build_app("model.int8.onnx", RayServeConfig(autoscaling=(1, 4)))
    serve.run(app, route_prefix="/v1/predict")          # HTTP, like the FastAPI server
    handle.predict.remote({"x": array}).result()       # or Python callers, arrays in and out
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgepipe.errors import ConfigError, EdgepipeError, InputError


@dataclass
class RayServeConfig:
    """How the deployment scales. `autoscaling=(min, max)` replaces the fixed `replicas`."""

    replicas: int = 1
    autoscaling: tuple[int, int] | None = None
    target_ongoing_requests: float = 16.0   # autoscaling aims at this many in flight per replica
    max_batch: int = 32
    max_delay_ms: float = 2.0
    max_queue: int = 256                    # per caller (HTTP proxy / handle); beyond it: 503
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    engine_options: dict = field(default_factory=dict)  # Engine(...) keywords: providers, threads

    def check(self) -> None:
        if self.replicas < 1:
            raise ConfigError(f"replicas must be >= 1, got {self.replicas}")
        if self.autoscaling is not None:
            low, high = self.autoscaling
            if not 0 <= low <= high or high < 1:
                raise ConfigError(f"autoscaling must be MIN:MAX with 0 <= MIN <= MAX and MAX >= 1, got {low}:{high}")
        if self.max_batch < 1 or self.max_delay_ms < 0 or self.max_queue < 1:
            raise ConfigError("max_batch and max_queue must be >= 1 and max_delay_ms >= 0")

    def deployment_options(self) -> dict:
        """Keyword arguments for `serve.deployment(...).options()`, checked by Ray itself."""
        from ray.serve.config import BackpressureConfig

        self.check()
        options = {
            # A replica must accept a full batch of requests at once, or batches never form.
            "max_ongoing_requests": max(2 * self.max_batch, 8),
            "max_queued_requests": self.max_queue,
            "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=1),
            "ray_actor_options": {"num_cpus": self.cpus_per_replica, "num_gpus": self.gpus_per_replica},
            "graceful_shutdown_timeout_s": 10,
        }
        if self.autoscaling is None:
            options["num_replicas"] = self.replicas
        else:
            low, high = self.autoscaling
            options["num_replicas"] = "auto"
            options["autoscaling_config"] = {
                "min_replicas": low, "initial_replicas": max(low, 1), "max_replicas": high,
                "target_ongoing_requests": self.target_ongoing_requests,
            }
        return options


def parse_autoscale(text: str | None) -> tuple[int, int] | None:
    """"1:4" -> (1, 4); None -> None."""
    if text is None:
        return None
    try:
        low, high = (int(part) for part in text.split(":"))
    except ValueError:
        raise ConfigError(f"--autoscale takes MIN:MAX replicas, e.g. 1:4; got '{text}'") from None
    return low, high


class _EngineService:
    """What a replica answers, apart from Ray: token streams for Python callers, HTTP predict and
    generate, and its counters. The deployment class adds the Engine and Ray's batching."""

    engine: object
    generator: object

    def generate_tokens(self, prompt_ids: list[int], max_new_tokens: int = 32, **sampling):
        """Python callers, decoders: `handle.options(stream=True).generate_tokens.remote(ids)`
        yields token ids as they come."""
        from edgepipe.runtime.generate import Sampling

        if self.generator is None:
            raise InputError(f"{self.engine.path} is not a decoder: nothing to generate")
        stop_ids = sampling.pop("stop_ids", None)
        yield from self.generator.stream(prompt_ids, max_new_tokens, sampling=Sampling(**sampling),
                                         stop_ids=stop_ids)

    async def __call__(self, request):
        from starlette.responses import JSONResponse, Response

        from edgepipe.serve.codec import encode_outputs, parse_body

        if request.url.path.rstrip("/").endswith("/generate"):
            return await self._generate(request)
        try:
            feeds = parse_body(self.engine, await request.body(),
                               request.headers.get("content-type", "application/json"))
            result = await self.infer(feeds)
            if isinstance(result, Exception):
                raise result
        except EdgepipeError as exc:
            return JSONResponse({"error": str(exc)}, status_code=422)
        body, media_type = encode_outputs(result, request.headers.get("accept", ""))
        return Response(body, media_type=media_type)

    async def _generate(self, request):
        """POST .../generate: the same body, validation and event stream as `edgepipe serve`."""
        from starlette.responses import JSONResponse, StreamingResponse

        from edgepipe.serve.generation import parse_request, sse_events

        if self.generator is None:
            return JSONResponse({"error": f"{self.engine.path.name} is not a decoder: POST /v1/predict"},
                                status_code=404)
        try:
            body = parse_request(await request.body(), self.generator)
        except EdgepipeError as exc:
            return JSONResponse({"error": str(exc)}, status_code=422)
        if body["stream"]:
            return StreamingResponse(sse_events(self.generator, body), media_type="text/event-stream")
        tokens = self.generator.generate(body["prompt"], body["max_new_tokens"], sampling=body["sampling"],
                                         stop_ids=body["stop_ids"])
        return JSONResponse({"tokens": tokens} | (
            {"text": self.generator.decode(tokens)} if body["text"] else {}))

    def stats(self) -> dict:
        return {"batches": self.batches, "rows": self.rows, "largest_batch": self.largest,
                "providers": list(self.engine.providers)}


def _deployment_class():
    """Defined on first use so that importing edgepipe.serve never needs Ray."""
    from ray import serve

    @serve.deployment(name="edgepipe")
    class EngineDeployment(_EngineService):
        def __init__(self, model: str, max_batch: int, max_delay_ms: float, engine_options: dict):
            from edgepipe.runtime import Engine
            from edgepipe.runtime.generate import DECODER_KEY, Generator

            self.engine = Engine(model, **engine_options)
            self.generator = Generator(self.engine) if DECODER_KEY in self.engine.metadata else None
            self.infer.set_max_batch_size(max_batch)
            self.infer.set_batch_wait_timeout_s(max_delay_ms / 1000)
            self.batches = self.rows = self.largest = 0  # counters, not a list: replicas run for months

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
        async def infer(self, requests: list[dict]) -> list:
            from edgepipe.serve.batcher import run_merged

            rows = sum(len(next(iter(r.values()))) for r in requests)
            self.batches, self.rows, self.largest = self.batches + 1, self.rows + rows, max(self.largest, rows)
            return run_merged(self.engine, requests)

        async def predict(self, inputs) -> dict:
            """Python callers: `handle.predict.remote({"x": array})` -> {output: array}."""
            feeds = self.engine.as_feeds(inputs)
            self.engine.validate(feeds)
            result = await self.infer(feeds)
            if isinstance(result, Exception):
                raise result
            return result

    return EngineDeployment


def build_app(model: str | Path, config: RayServeConfig | None = None):
    """A Ray Serve application serving `model` (an ONNX file) under `config`."""
    config = config or RayServeConfig()
    model = Path(model)
    if not model.is_file():
        raise InputError(f"ONNX model not found: {model}")
    try:
        deployment = _deployment_class()
    except ImportError as exc:
        raise InputError(f"Ray Serve needs the ray extra ({exc.name} missing): pip install 'edgepipe[ray]'") from None
    return deployment.options(**config.deployment_options()).bind(
        str(model.resolve()), config.max_batch, config.max_delay_ms, dict(config.engine_options))

