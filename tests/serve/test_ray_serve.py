"""Ray Serve deployment on a real local Ray cluster: replicas, batching, HTTP and handles."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import numpy as np
import pytest

from edgepipe.errors import ConfigError
from edgepipe.runtime import Engine

ray = pytest.importorskip("ray", reason="the ray extra is not installed")
serve = pytest.importorskip("ray.serve")

from edgepipe.serve.ray_app import RayServeConfig, build_app  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_deployment_options_are_accepted_by_ray(zoo):
    fixed = RayServeConfig(replicas=3, max_batch=16).deployment_options()
    assert fixed["num_replicas"] == 3 and fixed["max_ongoing_requests"] >= 16  # a batch can form
    auto = RayServeConfig(autoscaling=(1, 4), target_ongoing_requests=8).deployment_options()
    assert auto["num_replicas"] == "auto"
    assert auto["autoscaling_config"] == {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 4,
                                          "target_ongoing_requests": 8}
    app = build_app(zoo["mlp"].onnx, RayServeConfig(autoscaling=(1, 4), max_batch=16))  # Ray validates them
    deployment = app._bound_deployment  # what Ray will deploy: our options and engine arguments
    assert deployment._deployment_config.autoscaling_config.max_replicas == 4
    assert deployment.init_args[0] == str(zoo["mlp"].onnx.resolve()) and deployment.init_args[1] == 16
    with pytest.raises(ConfigError, match="MIN:MAX"):
        RayServeConfig(autoscaling=(3, 2)).deployment_options()
    with pytest.raises(ConfigError, match="replicas"):
        RayServeConfig(replicas=0).deployment_options()


def test_cli_refuses_bad_backend_options(zoo, cli):
    result = cli("serve", zoo["mlp"].onnx, "--backend", "ray", "--autoscale", "4")
    assert result.exit_code == 2 and "MIN:MAX" in result.output
    result = cli("serve", zoo["mlp"].onnx, "--backend", "kubernetes")
    assert result.exit_code == 2 and "'kubernetes' is not one of 'http', 'ray'" in result.output


@pytest.mark.slow
def test_cli_serves_on_ray_until_interrupted(zoo, tmp_path):
    """`edgepipe serve --backend ray` as a user runs it: its own local cluster, answers, Ctrl-C."""
    import contextlib
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    port = _free_port()
    cli = Path(sys.executable).parent / "edgepipe"
    log = tmp_path / "serve.log"

    def as_from_a_terminal():
        # a job started with `&` by a non-interactive shell (as CI may run this suite) inherits
        # SIGINT ignored; a user's terminal delivers Ctrl-C, so the server gets the default
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    # its own session, so a server that fails to stop is killed with the cluster it started
    # (left running, one holds ports and processes that slow every later Ray start and stop);
    # output goes to a file so that the wait is for the server, not for every process that
    # inherited its stdout
    with open(log, "w") as sink:
        process = subprocess.Popen([str(cli), "serve", str(zoo["mlp"].onnx), "--backend", "ray", "--autoscale", "1:2",
                                    "--port", str(port)], stdout=sink, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True, preexec_fn=as_from_a_terminal)
    x = zoo["mlp"].dataset.x_test[:3]
    try:
        deadline, response = time.time() + 120, None
        while time.time() < deadline and process.poll() is None:
            try:
                response = httpx.post(f"http://127.0.0.1:{port}/v1/predict", json={"inputs": {"x": x.tolist()}})
                if response.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        assert response is not None and response.status_code == 200, (process.poll(), log.read_text()[-2000:])
        np.testing.assert_allclose(np.asarray(response.json()["outputs"]["logits"], np.float32),
                                   Engine(zoo["mlp"].onnx).run(x)["logits"], rtol=1e-5, atol=1e-5)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            code = process.wait(timeout=60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # whatever it left behind
    output = log.read_text()
    assert code == 130, output[-2000:]
    assert "Ray Serve (autoscaling 1:2" in output and "interrupted" in output


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 << 20, log_to_driver=False,
             configure_logging=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.mark.slow
def test_two_replicas_serve_unmixed_batched_results_over_http_and_handles(zoo, ray_cluster):
    model = zoo["cnn"].onnx
    engine = Engine(model)
    config = RayServeConfig(replicas=2, cpus_per_replica=0.5, max_batch=16, max_delay_ms=20)
    handle = serve.run(build_app(model, config), name="cnn", route_prefix="/cnn")
    url = ray_cluster + "/cnn"

    rng = np.random.default_rng(1)
    inputs = [rng.random((1 + i % 3, 1, 8, 8), dtype=np.float32) for i in range(64)]

    async def post_all():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=32)) as client:
            return await asyncio.gather(*(client.post(url, json={"inputs": {"x": x.tolist()}}) for x in inputs))

    responses = asyncio.run(post_all())
    for x, response in zip(inputs, responses):
        assert response.status_code == 200, response.text
        got = np.asarray(response.json()["outputs"]["logits"], np.float32)
        np.testing.assert_allclose(got, engine.run(x)["logits"], rtol=1e-5, atol=1e-5)

    # Python callers: arrays in, arrays out, concurrently, through the same batching.
    futures = [handle.predict.remote({"x": x}) for x in inputs[:16]]
    for x, future in zip(inputs, futures):
        np.testing.assert_allclose(future.result()["logits"], engine.run(x)["logits"], rtol=1e-5, atol=1e-5)

    # Bad input: the same one-line 4xx as the FastAPI server, not a 500.
    bad = httpx.post(url, json={"inputs": {"x": [[1.0, 2.0]]}}, timeout=30)
    assert bad.status_code == 422 and "model expects 4" in bad.json()["error"]
    nan_body = json.dumps({"inputs": {"x": np.full((1, 1, 8, 8), np.nan).tolist()}})  # Python writes NaN
    nan = httpx.post(url, content=nan_body, headers={"content-type": "application/json"}, timeout=30)
    assert nan.status_code == 422 and "NaN" in nan.json()["error"]

    stats = [handle.stats.remote().result() for _ in range(8)]
    assert max(s["largest_batch"] for s in stats) > 3, stats  # concurrent requests were merged
    status = serve.status().applications["cnn"].deployments["edgepipe"]
    assert status.replica_states.get("RUNNING") == 2
    serve.delete("cnn")


@pytest.mark.slow
def test_a_decoder_streams_generation_on_ray_serve(tiny_decoder, ray_cluster):
    from edgepipe.runtime.generate import Generator

    model = tiny_decoder.artifacts["onnx"]
    generator = Generator(model)
    expected = generator.generate([1, 2, 3], 6, stop_ids=())
    handle = serve.run(build_app(model, RayServeConfig(cpus_per_replica=0.5)), name="lm", route_prefix="/lm")
    response = httpx.post(ray_cluster + "/lm/generate", json={"prompt_ids": [1, 2, 3], "max_new_tokens": 6,
                                                              "stop_ids": []}, timeout=60)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]
    assert [e["token"] for e in events[:-1]] == expected and events[-1]["tokens"] == expected
    text = httpx.post(ray_cluster + "/lm/generate", json={"prompt": "Hi", "max_new_tokens": 4, "stop_ids": [],
                                                          "stream": False}, timeout=60).json()
    assert text["text"] == generator.decode(generator.generate(generator.encode("Hi"), 4, stop_ids=()))
    bad = httpx.post(ray_cluster + "/lm/generate", json={"prompt_ids": [999]}, timeout=30)
    assert bad.status_code == 422 and "outside the vocabulary" in bad.json()["error"]
    streamed = list(handle.options(stream=True).generate_tokens.remote([1, 2, 3], 6, stop_ids=[]))
    assert streamed == expected
    serve.delete("lm")
