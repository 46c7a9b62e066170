"""Engine: provider choice, input validation with clear errors, named outputs."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from edgepipe.errors import InputError
from edgepipe.runtime import Engine, make_feeds


def test_outputs_match_raw_session(zoo):
    engine = Engine(zoo["cnn"].onnx)
    x = zoo["cnn"].dataset.x_test[:5]
    raw = ort.InferenceSession(str(zoo["cnn"].onnx), providers=["CPUExecutionProvider"])
    expected = raw.run(None, {"x": x})[0]
    for feeds in ({"x": x}, x, [x]):
        np.testing.assert_array_equal(engine.run(feeds)["logits"], expected)


def test_reports_actual_provider_and_specs(zoo):
    engine = Engine(zoo["transformer"].onnx, providers="auto", threads=1)
    assert engine.providers[-1] == "CPUExecutionProvider"
    (spec,) = engine.inputs
    assert (spec.name, spec.dtype, spec.shape) == ("ids", "int64", ("batch", "seq"))
    assert spec.high == zoo["transformer"].dataset.vocab_size  # from the export metadata


@pytest.mark.parametrize("feeds, message", [
    ({"image": np.zeros((1, 1, 8, 8), np.float32)}, "unknown input(s) 'image'"),
    ({"x": np.zeros((1, 1, 8, 8), np.float64)}, "dtype float64, model expects float32"),
    ({"x": np.zeros((1, 8, 8), np.float32)}, "has 3 dims [1, 8, 8], model expects 4"),
    ({"x": np.zeros((1, 3, 8, 8), np.float32)}, "axis 1 must be 1"),
    ({}, "missing input 'x'"),
])
def test_invalid_inputs_raise_input_error(zoo, feeds, message):
    with pytest.raises(InputError) as err:
        Engine(zoo["cnn"].onnx).run(feeds)
    assert message in str(err.value)


def test_every_problem_is_listed_at_once(zoo):
    with pytest.raises(InputError) as err:
        Engine(zoo["cnn"].onnx).run({"x": np.zeros((1, 8, 8), np.float64), "extra": np.zeros(1)})
    text = str(err.value)
    assert "unknown input(s) 'extra'" in text and "dtype float64" in text and "3 dims" in text


def test_missing_and_corrupt_model_files(tmp_path):
    with pytest.raises(InputError, match="ONNX model not found"):
        Engine(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not protobuf")
    with pytest.raises(InputError, match="cannot load ONNX model"):
        Engine(bad)


def test_unavailable_provider_lists_what_exists(zoo):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA")
    with pytest.raises(InputError) as err:
        Engine(zoo["mlp"].onnx, providers="cuda")
    assert "CPUExecutionProvider" in str(err.value) and "edgepipe[gpu]" in str(err.value)
    with pytest.raises(InputError, match="allow_fallback"):
        Engine(zoo["mlp"].onnx, providers=["cuda", "cpu"])
    engine = Engine(zoo["mlp"].onnx, providers=["cuda", "cpu"], allow_fallback=True)
    assert engine.providers == ["CPUExecutionProvider"]


def test_make_feeds_respects_spec(zoo):
    engine = Engine(zoo["lstm"].onnx)
    feeds = make_feeds(engine.inputs, batch=3, dims={"seq": 11})
    assert feeds["ids"].shape == (3, 11) and feeds["ids"].dtype == np.int64
    assert feeds["ids"].max() < zoo["lstm"].dataset.vocab_size
    assert engine.run(feeds)["logits"].shape == (3, 4)


@pytest.mark.gpu
def test_cuda_provider_runs_when_present(zoo):
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("no CUDA provider (install edgepipe[gpu] on a GPU machine)")
    engine = Engine(zoo["mlp"].onnx, providers="cuda")
    assert engine.providers[0] == "CUDAExecutionProvider"
    x = zoo["mlp"].dataset.x_test[:4]
    np.testing.assert_allclose(engine.run(x)["logits"], Engine(zoo["mlp"].onnx, providers="cpu").run(x)["logits"],
                               atol=1e-3)
