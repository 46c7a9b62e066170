"""Serving on loopback: unmixed results under concurrency, overload, bad requests."""

from __future__ import annotations

import asyncio
import io
import json

import httpx
import numpy as np
import pytest
import uvicorn
from loopback import LoopbackServer

from edgepipe.runtime import Engine
from edgepipe.serve.app import create_app


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


def _token_model(path, *, limits: bool, vocab: int = 50, positions: int = 16):
    """input_ids and attention_mask [batch, seq] -> logits [batch, 4]: a masked sum of embedding
    rows (Gather). With `limits`, the input specs carry the vocabulary and the position limit, as
    an exported Hugging Face model's do; without, the server knows only names, dtypes and ranks."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgepipe.runtime.spec import METADATA_KEY, InputSpec, specs_to_json

    table = np.random.default_rng(0).standard_normal((vocab, 4)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["emb"]),
             helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["maskf", "last"], ["mask3"]),
             helper.make_node("Mul", ["emb", "mask3"], ["masked"]),
             helper.make_node("ReduceSum", ["masked", "seq_axis"], ["logits"], keepdims=0)]
    graph = helper.make_graph(
        nodes, "tokens",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"])
         for n in ("input_ids", "attention_mask")],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.array([-1], np.int64), "last"),
         numpy_helper.from_array(np.array([1], np.int64), "seq_axis")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    if limits:
        specs = [InputSpec("input_ids", "int64", ("batch", "seq"), 0, vocab, vocab=vocab, max_dims={"seq": positions}),
                 InputSpec("attention_mask", "int64", ("batch", "seq"), 1, 2, vocab=2, max_dims={"seq": positions})]
        helper.set_model_props(model, {METADATA_KEY: specs_to_json(specs)})
    onnx.save(model, path)
    return Engine(path), table


def test_one_bad_request_does_not_fail_the_requests_batched_with_it(tmp_path):
    # no limits in the file: the bad id reaches onnxruntime's Gather, which fails the merged call
    engine, table = _token_model(tmp_path / "tokens.onnx", limits=False)
    rng = np.random.default_rng(1)
    ids = [rng.integers(0, 50, (1, 6)) for _ in range(24)]
    ids[5] = np.array([[1, 2, 5000, 3, 4, 5]])
    bodies = [{"inputs": {"input_ids": x.tolist(), "attention_mask": np.ones_like(x).tolist()}} for x in ids]
    app = create_app(engine, max_batch=32, max_delay_ms=20)
    with LoopbackServer(app) as server:
        for _ in range(3):
            responses = asyncio.run(_post_all(server.url, bodies, 24))
            assert responses[5].status_code == 422 and "Gather node" in responses[5].json()["error"]
            assert "onnxruntime_src" not in responses[5].text and "[ONNXRuntimeError]" not in responses[5].text
            for i, (x, response) in enumerate(zip(ids, responses)):
                if i != 5:
                    assert response.status_code == 200, response.text
                    np.testing.assert_allclose(response.json()["outputs"]["logits"], table[x].sum(1), rtol=1e-5)
        metrics = httpx.get(server.url + "/metrics").text
    assert float(metrics.split("edgepipe_batch_size_count ")[1].split()[0]) < 72  # they were merged


@pytest.mark.parametrize("inputs, message", [
    ({"input_ids": [[1, 2, 5000]], "attention_mask": [[1, 1, 1]]}, "holds 5000, outside the model's range 0..49"),
    ({"input_ids": [[1, -2, 3]], "attention_mask": [[1, 1, 1]]}, "holds -2, outside the model's range 0..49"),
    ({"input_ids": [[1.5, 2.7]], "attention_mask": [[1, 1]]}, "holds 1.5, not an integer"),
    ({"input_ids": [list(range(20))], "attention_mask": [[1] * 20]}, "has seq = 20, more than the model's 16"),
    ({"input_ids": [[]], "attention_mask": [[]]}, "input 'input_ids' is empty"),
    ({"input_ids": [[1, 2, 3]], "attention_mask": [[1, 1]]}, "has seq = 2 but 'input_ids' has seq = 3"),
    ({"input_ids": [[1, 2]], "attention_mask": [[1, 7]]}, "'attention_mask' holds 7, outside the model's range 0..1"),
])
def test_predict_checks_values_against_the_models_own_limits(tmp_path, inputs, message):
    engine, table = _token_model(tmp_path / "tokens.onnx", limits=True)
    with LoopbackServer(create_app(engine)) as server:
        bad = httpx.post(server.url + "/v1/predict", json={"inputs": inputs})
        good = httpx.post(server.url + "/v1/predict",
                          json={"inputs": {"input_ids": [[1.0, 2.0]], "attention_mask": [[1, 1]]}})
    assert bad.status_code == 422 and message in bad.json()["error"], bad.text
    assert "onnxruntime" not in bad.text
    assert good.status_code == 200 and np.allclose(good.json()["outputs"]["logits"], table[[[1, 2]]].sum(1))


def test_an_api_key_guards_the_v1_routes_and_probes_stay_open(zoo):
    app = create_app(Engine(zoo["mlp"].onnx), api_key="s3cret")
    body = {"inputs": {"x": zoo["mlp"].dataset.x_test[:2].tolist()}}
    with LoopbackServer(app) as server:
        missing = httpx.post(server.url + "/v1/predict", json=body)
        wrong = httpx.post(server.url + "/v1/predict", json=body, headers={"authorization": "Bearer s3cre"})
        right = httpx.post(server.url + "/v1/predict", json=body, headers={"authorization": "Bearer s3cret"})
        probes = [httpx.get(server.url + p).status_code for p in ("/healthz", "/readyz", "/metrics")]
    assert missing.status_code == wrong.status_code == 401 and "Authorization: Bearer" in missing.json()["error"]
    assert missing.headers["www-authenticate"] == "Bearer"
    assert right.status_code == 200 and probes == [200, 200, 200]


def test_serving_off_loopback_warns_what_is_exposed_and_tls_needs_both_files(tmp_path):
    from edgepipe.cli.serve_cmd import check_tls, exposure_warnings
    from edgepipe.errors import ConfigError

    assert exposure_warnings("127.0.0.1", None, {}) == exposure_warnings("::1", None, {}) == []
    assert exposure_warnings("localhost", None, {}) == []
    bare = exposure_warnings("0.0.0.0", None, {})
    assert len(bare) == 2 and "without an API key" in bare[0] and "plain HTTP" in bare[1]
    assert exposure_warnings("10.1.2.3", "k", {"ssl_certfile": "c", "ssl_keyfile": "k"}) == []
    (tmp_path / "cert.pem").write_text("x")
    with pytest.raises(ConfigError, match="needs both --ssl-certfile and --ssl-keyfile"):
        check_tls(tmp_path / "cert.pem", None)
    with pytest.raises(ConfigError, match="--ssl-keyfile .*: no such file"):
        check_tls(tmp_path / "cert.pem", tmp_path / "key.pem")


def test_serve_starts_on_a_run_that_deployed_an_openvino_model(tmp_path, cli, monkeypatch):
    pytest.importorskip("openvino")
    from test_openvino import _cnn

    run = tmp_path / "run"
    (run / "cnn").mkdir(parents=True)
    _cnn(run / "cnn" / "model.int8.onnx")
    chosen = {"backend": "openvino", "sessions": {"1": {"threads": 1, "spinning": False}}}
    (run / "manifest.json").write_text(json.dumps({"schema": 2, "models": {"cnn": {"stages": {"quantize": {
        "status": "ok", "record": {"chosen": chosen, "fp32": {"sessions": {}}}}}}}}))
    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: started.update(app=app, **kwargs))
    result = cli("serve", run, "--port", "18431")
    assert result.exit_code == 0, result.output
    assert "openvino" in result.output and started["app"].state.engine.backend == "openvino"
