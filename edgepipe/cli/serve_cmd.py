"""`edgepipe serve`: the model over HTTP with dynamic batching."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from edgepipe.cli import app
from edgepipe.cli._common import handle_errors


@app.command()
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
) -> None:
    """Serve a model over HTTP: POST /v1/predict (JSON {"inputs": {...}} or a raw .npy body),
    GET /healthz, /readyz, /metrics (Prometheus). Concurrent requests are batched dynamically;
    a full queue answers 503 with Retry-After; shutdown (Ctrl-C) finishes in-flight requests."""
    try:
        import uvicorn

        from edgepipe.serve.app import create_app
    except ImportError as exc:
        from edgepipe.errors import InputError

        raise InputError(f"serving needs the serve extra ({exc.name} missing): pip install 'edgepipe[serve]'") from None
    from edgepipe.runtime import Engine

    options = {"providers": provider, "threads": threads}
    engine = Engine.from_run(model, name, **options) if model.is_dir() else Engine(model, **options)
    typer.echo(f"serving {engine.path} on http://{host}:{port} ({engine.providers[0]}, max batch {max_batch})")
    application = create_app(engine, max_batch=max_batch, max_delay_ms=max_delay_ms, max_queue=max_queue,
                             timeout_s=timeout)
    uvicorn.run(application, host=host, port=port, log_level="warning", timeout_graceful_shutdown=10)
