"""`edgepipe serve`: the model over HTTP with dynamic batching."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from edgepipe.cli._common import handle_errors
from edgepipe.cli.choices import ServeBackend


@handle_errors
def serve(
    model: Annotated[Path, typer.Argument(help="ONNX model, or a run directory (serves its deployed model).")],
    name: Annotated[Optional[str], typer.Option("--model-name", help="Model of the run directory to serve.")] = None,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.")] = 8000,
    max_batch: Annotated[int, typer.Option(help="Most rows merged into one model call.")] = 32,
    max_delay_ms: Annotated[float, typer.Option(help="Longest wait for more requests to merge.")] = 2.0,
    max_queue: Annotated[int, typer.Option(help="Requests waiting before new ones get 503 + Retry-After.")] = 256,
    timeout: Annotated[float, typer.Option(help="Per-request timeout in seconds (504 after it).")] = 5.0,
    threads: Annotated[Optional[int], typer.Option(help="onnxruntime intra-op threads.")] = None,
    provider: Annotated[str, typer.Option(help="auto, cpu, cuda, tensorrt.")] = "auto",
    spin: Annotated[bool, typer.Option(
        help="Let idle onnxruntime threads busy-wait for the next call. Off by default: they would take "
             "cores from the HTTP loop (measured: 10.3k vs 8.3k req/s batched on 2 cores). On can "
             "help latency when --max-batch is 1 and cores are spare.")] = False,
    provider_option: Annotated[Optional[list[str]], typer.Option(
        help="PROVIDER.KEY=VALUE (repeatable), e.g. cuda.device_id=1, tensorrt.trt_fp16_enable=True.")] = None,
    backend: Annotated[ServeBackend, typer.Option(
        help="http: one process (FastAPI + uvicorn). ray: a Ray Serve deployment with replicas "
             "or autoscaling, on the Ray cluster at --ray-address (or a new local one).")] = ServeBackend.http,
    replicas: Annotated[int, typer.Option(help="ray: fixed number of replicas.")] = 1,
    autoscale: Annotated[Optional[str], typer.Option(
        help="ray: MIN:MAX replicas, scaled by Ray Serve on requests in flight (replaces --replicas).")] = None,
    ray_address: Annotated[Optional[str], typer.Option(help="ray: address of an existing cluster.")] = None,
    api_key: Annotated[Optional[str], typer.Option(
        envvar="EDGEPIPE_API_KEY", show_envvar=True,
        help="http: require 'Authorization: Bearer KEY' on every /v1/ route (401 without it); "
             "/healthz, /readyz and /metrics stay open. Prefer the environment variable: a command "
             "line is visible to other users of the machine.")] = None,
    ssl_certfile: Annotated[Optional[Path], typer.Option(help="http: serve HTTPS with this certificate (PEM).")] = None,
    ssl_keyfile: Annotated[Optional[Path], typer.Option(help="http: the certificate's private key (PEM).")] = None,
    allow_out_of_budget: Annotated[bool, typer.Option(
        help="Serve a quantized model on a backend where its own record says it is out of its accuracy or "
             "speed budget (refused otherwise).")] = False,
) -> None:
    """Serve a model over HTTP: POST /v1/predict (JSON {"inputs": {...}} or a raw .npy body).
    A decoder (from `edgepipe export` of a causal LM folder) also answers POST /v1/generate:
    {"prompt_ids": [...]} or {"prompt": "text"}, streamed as server-sent events, one per token.
    Concurrent requests are batched dynamically; a full queue answers 503 with Retry-After.
    The http backend also has GET /healthz, /readyz, /metrics (Prometheus) and finishes in-flight
    requests on shutdown (Ctrl-C); the ray backend uses Ray Serve's own health, metrics and
    graceful shutdown, with the same request format and errors."""
    from edgepipe.runtime.sessions import parse_provider_options
    from edgepipe.serve.batcher import check_limits

    check_limits(max_batch, max_delay_ms, max_queue, timeout)
    if threads is not None and threads < 1:
        from edgepipe.errors import ConfigError

        raise ConfigError(f"--threads must be >= 1, got {threads}")
    if backend is ServeBackend.ray:
        if api_key or ssl_certfile or ssl_keyfile:
            from edgepipe.errors import ConfigError

            raise ConfigError("--api-key and --ssl-* are for the http backend; secure Ray Serve with its own "
                              "proxy settings")
        return _serve_on_ray(model, name, host, port, max_batch, max_delay_ms, max_queue, threads, provider,
                             replicas, autoscale, ray_address, parse_provider_options(provider_option or []),
                             allow_out_of_budget)
    tls = check_tls(ssl_certfile, ssl_keyfile)
    _serve_http(model, name, host, port, max_batch, max_delay_ms, max_queue, timeout,
                {"providers": provider, "threads": threads, "spinning": spin,
                 "provider_options": parse_provider_options(provider_option or []),
                 "allow_out_of_budget": allow_out_of_budget}, api_key, tls)


def check_tls(certfile: Optional[Path], keyfile: Optional[Path]) -> dict:
    """uvicorn's TLS settings from --ssl-certfile/--ssl-keyfile: both or neither, both readable."""
    from edgepipe.errors import ConfigError

    if (certfile is None) != (keyfile is None):
        raise ConfigError("HTTPS needs both --ssl-certfile and --ssl-keyfile")
    if certfile is None:
        return {}
    for what, path in (("--ssl-certfile", certfile), ("--ssl-keyfile", keyfile)):
        if not path.is_file():
            raise ConfigError(f"{what} {path}: no such file")
    return {"ssl_certfile": str(certfile), "ssl_keyfile": str(keyfile)}


def exposure_warnings(host: str, api_key: Optional[str], tls: dict) -> list[str]:
    """What to warn about when the server is reachable from other machines."""
    import ipaddress

    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        loopback = False
    if loopback:
        return []
    warnings = []
    if not api_key:
        warnings.append(f"warning: serving on {host} without an API key: anyone who can reach this port can run "
                        "the model and load the machine (set EDGEPIPE_API_KEY or --api-key)")
    if not tls:
        warnings.append(f"warning: serving on {host} over plain HTTP: requests" + (", results and the API key"
                        if api_key else " and results") + " travel unencrypted "
                        "(add --ssl-certfile and --ssl-keyfile, or put a TLS proxy in front)")
    return warnings


def _serve_http(model, name, host, port, max_batch, max_delay_ms, max_queue, timeout, options,
                api_key=None, tls=None) -> None:
    from edgepipe.serve.batcher import ensure_port_free

    try:
        import uvicorn

        from edgepipe.serve.app import create_app
    except ImportError as exc:
        from edgepipe.errors import InputError

        raise InputError(f"serving needs the serve extra ({exc.name} missing): pip install 'edgepipe[serve]'") from None
    from edgepipe.runtime import Engine

    ensure_port_free(host, port)
    engine = Engine.from_run(model, name, **options) if model.is_dir() else Engine(model, **options)
    from edgepipe.runtime.generate import DECODER_KEY

    routes = " (POST /v1/generate streams tokens)" if DECODER_KEY in engine.metadata else ""
    scheme = "https" if tls else "http"
    typer.echo(f"serving {engine.path} on {scheme}://{host}:{port} ({engine.backend}, {engine.providers[0]}, "
               f"max batch {max_batch})" + routes + (", API key required on /v1/" if api_key else ""))
    for line in exposure_warnings(host, api_key, tls or {}):
        typer.echo(line, err=True)
    if engine.backend == "onnxruntime" and engine.providers[0] != "CPUExecutionProvider":  # placement is ORT's
        fell = engine.placement()["fell_back"]
        if fell:
            typer.echo(f"note: {len(fell)} node(s) run on the CPU, not {engine.providers[0]}: "
                       + ", ".join(f"{r['node']} ({r['op']})" for r in fell[:8]))
    application = create_app(engine, max_batch=max_batch, max_delay_ms=max_delay_ms, max_queue=max_queue,
                             timeout_s=timeout, api_key=api_key)
    uvicorn.run(application, host=host, port=port, log_level="warning", timeout_graceful_shutdown=10, **(tls or {}))


def _serve_on_ray(model, name, host, port, max_batch, max_delay_ms, max_queue, threads, provider,
                  replicas, autoscale, ray_address, provider_options, allow_out_of_budget=False) -> None:
    from edgepipe.errors import InputError
    from edgepipe.runtime import Engine
    from edgepipe.serve.ray_app import RayServeConfig, build_app, parse_autoscale

    try:
        import ray
        from ray import serve
    except ImportError:
        raise InputError("the ray backend needs the ray extra: pip install 'edgepipe[ray]'") from None
    checked = {"allow_out_of_budget": allow_out_of_budget}
    path = (Engine.from_run(model, name, **checked) if model.is_dir() else Engine(model, **checked)).path  # it loads
    options = {"providers": provider, "provider_options": provider_options, **checked} | (
        {"threads": threads} if threads else {})
    config = RayServeConfig(replicas=replicas, autoscaling=parse_autoscale(autoscale), max_batch=max_batch,
                            max_delay_ms=max_delay_ms, max_queue=max_queue,
                            gpus_per_replica=1.0 if provider in ("cuda", "gpu", "tensorrt", "trt") else 0.0,
                            engine_options=options)
    application = build_app(path, config)
    ray.init(address=ray_address, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    from edgepipe.runtime.generate import is_decoder_file

    decoder = is_decoder_file(path)  # decoders also answer POST /v1/generate
    scale = f"autoscaling {autoscale}" if autoscale else f"{replicas} replica(s)"
    routes = "/v1/predict and /v1/generate" if decoder else "/v1/predict"
    typer.echo(f"serving {path} on http://{host}:{port} ({routes}) with Ray Serve ({scale}, max batch {max_batch})")
    serve.run(application, name="edgepipe", route_prefix="/v1" if decoder else "/v1/predict", blocking=True)
