"""Serving on loopback: unmixed results under concurrency, overload, bad requests."""

from __future__ import annotations

import asyncio
import io
import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn

from edgepipe.runtime import Engine
from edgepipe.serve.app import create_app


class LoopbackServer:
    """uvicorn on 127.0.0.1, an OS-chosen port, in a thread; stops by itself at exit."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=20)


async def _post_all(url: str, bodies: list[dict], concurrency: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        return await asyncio.gather(*(client.post("/v1/predict", json=b) for b in bodies))


def test_concurrent_clients_get_their_own_results_and_requests_are_batched(zoo):
    engine = Engine(zoo["cnn"].onnx)
    rng = np.random.default_rng(0)
    inputs = [rng.random((1 + i % 3, 1, 8, 8), dtype=np.float32) for i in range(96)]
    with LoopbackServer(create_app(engine, max_batch=32, max_delay_ms=5)) as server:
        responses = asyncio.run(_post_all(server.url, [{"inputs": {"x": x.tolist()}} for x in inputs], 32))
        metrics = httpx.get(server.url + "/metrics").text
    for x, response in zip(inputs, responses):
        assert response.status_code == 200, response.text
        got = np.asarray(response.json()["outputs"]["logits"], np.float32)
        np.testing.assert_allclose(got, engine.run(x)["logits"], rtol=1e-5, atol=1e-5)  # its own input's answer
    assert 'edgepipe_requests_total{status="200"} 96.0' in metrics
    count = float(metrics.split("edgepipe_batch_size_count ")[1].split()[0])
    assert count < 96  # several requests were merged into one model call


def test_overload_answers_503_with_retry_after_and_keeps_serving(zoo):
    engine = Engine(zoo["transformer"].onnx)
    ids = np.ones((4, 24), np.int64).tolist()
    app = create_app(engine, max_batch=4, max_delay_ms=0, max_queue=2)
    with LoopbackServer(app) as server:
        responses = asyncio.run(_post_all(server.url, [{"inputs": {"ids": ids}}] * 64, 64))
        codes = [r.status_code for r in responses]
        assert 503 in codes and 200 in codes and set(codes) <= {200, 503}
        assert all(r.headers.get("retry-after") == "1" for r in responses if r.status_code == 503)
        assert httpx.get(server.url + "/healthz").status_code == 200
        assert httpx.post(server.url + "/v1/predict", json={"inputs": {"ids": ids}}).status_code == 200


@pytest.mark.parametrize("kwargs, status, message", [
    ({"content": b"{not json"}, 422, "not valid JSON"),
    ({"json": {"inputs": {"x": [[1, 2, 3]]}}}, 422, "has 2 dims"),
    ({"json": {"inputs": {"image": []}}}, 422, "missing input 'x'"),
    ({"content": b'{"inputs": {"x": [[' + b",".join([b"[" + b",".join([b"NaN"] * 8) + b"]"] * 8) + b"]]}}"},
     422, "NaN or infinity"),
    ({"json": {"inputs": {"x": [[[[1, 2]]], [1]]}}}, 422, "not a rectangular array"),
    ({"content": b"x" * (2 << 20)}, 413, "exceeds the limit"),
])
def test_bad_requests_get_4xx_that_say_what_is_wrong(zoo, kwargs, status, message):
    app = create_app(Engine(zoo["cnn"].onnx), max_body_bytes=1 << 20)
    with LoopbackServer(app) as server:
        response = httpx.post(server.url + "/v1/predict", **kwargs)
    assert response.status_code == status
    assert message in response.json()["error"]


def test_npy_bodies_and_readiness(zoo):
    engine = Engine(zoo["mlp"].onnx)
    x = zoo["mlp"].dataset.x_test[:3]
    buffer = io.BytesIO()
    np.save(buffer, x)
    with LoopbackServer(create_app(engine)) as server:
        ready = httpx.get(server.url + "/readyz").json()
        response = httpx.post(server.url + "/v1/predict", content=buffer.getvalue(),
                              headers={"content-type": "application/x-npy", "accept": "application/x-npy"})
    assert ready["status"] == "ready" and ready["inputs"][0]["name"] == "x"
    np.testing.assert_array_equal(np.load(io.BytesIO(response.content)), engine.run(x)["logits"])


def test_npy_codec_round_trips_and_refuses_bad_bodies():
    from edgepipe.errors import InputError
    from edgepipe.serve.codec import read_npy, write_npy

    rng = np.random.default_rng(0)
    for array in (rng.random((3, 1, 8, 8), dtype=np.float32), np.arange(6).reshape(2, 3),
                  np.asfortranarray(rng.random((4, 5))), np.zeros((0, 4), np.float32)):
        buffer = io.BytesIO()
        np.save(buffer, array)
        for _ in range(2):  # second time from the header cache
            got = read_npy(buffer.getvalue())
            assert got.dtype == array.dtype and np.array_equal(got, array)
        assert write_npy(array) == _saved(np.ascontiguousarray(array))  # byte-identical to np.save
    body = _saved(np.ones((2, 2)))
    with pytest.raises(InputError, match="holds 29 data bytes"):
        read_npy(body[:-3])
    with pytest.raises(InputError, match="holds 34 data bytes"):
        read_npy(body + b"xx")
    with pytest.raises(InputError, match="NUMPY magic"):
        read_npy(b"hello")
    with pytest.raises(InputError, match="bad header"):
        read_npy(body[:12])
    with pytest.raises(InputError, match="object arrays are not accepted"):  # never unpickled
        read_npy(_saved(np.array([{"a": 1}], dtype=object), allow_pickle=True))


def _saved(array, **kwargs) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, **kwargs)
    return buffer.getvalue()
