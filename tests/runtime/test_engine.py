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


def test_io_binding_on_the_cpu_matches_run_and_chains_ortvalues(zoo):
    engine = Engine(zoo["transformer"].onnx)
    feeds = make_feeds(engine.inputs, batch=5, dims={"seq": 9})
    expected = engine.run(feeds)["logits"]
    np.testing.assert_array_equal(engine.run_bound(feeds, device="cpu")["logits"], expected)
    kept = engine.run_bound({"ids": engine.to_device(feeds["ids"], "cpu")}, device="cpu", keep_on_device=True)
    assert isinstance(kept["logits"], ort.OrtValue) and kept["logits"].shape() == [5, 4]
    np.testing.assert_array_equal(kept["logits"].numpy(), expected)
    with pytest.raises(InputError, match="missing input 'ids'"):
        engine.run_bound({}, device="cpu")
    with pytest.raises(InputError, match="dtype float32"):
        engine.run_bound({"ids": feeds["ids"].astype(np.float32)}, device="cpu")


def test_provider_options_are_parsed_checked_and_passed(zoo):
    from edgepipe.runtime.sessions import parse_provider_options, session_providers

    assert parse_provider_options(["cuda.device_id=1", "tensorrt.trt_fp16_enable=True",
                                   "cuda.arena_extend_strategy=kSameAsRequested"]) == {
        "cuda": {"device_id": "1", "arena_extend_strategy": "kSameAsRequested"},
        "tensorrt": {"trt_fp16_enable": "True"}}
    with pytest.raises(InputError, match="PROVIDER.KEY=VALUE"):
        parse_provider_options(["device_id=1"])
    assert session_providers(["CUDAExecutionProvider", "CPUExecutionProvider"], {"cuda": {"device_id": 1}}) == [
        ("CUDAExecutionProvider", {"device_id": "1"}), "CPUExecutionProvider"]
    with pytest.raises(InputError, match="does not use"):
        Engine(zoo["mlp"].onnx, providers="cpu", provider_options={"cuda": {"device_id": 0}})


def test_placement_lists_nodes_that_left_the_preferred_provider(zoo):
    from edgepipe.runtime.placement import placement_report

    cpu = Engine(zoo["cnn"].onnx).placement()
    assert cpu["fell_back"] == [] and sum(cpu["nodes_per_provider"].values()) > 3
    assert set(cpu["nodes_per_provider"]) == {"CPUExecutionProvider"}
    # A CUDA session as the profiler records it: two ops without CUDA kernels, copies around them.
    nodes = {"conv": {"node": "conv", "op": "Conv", "provider": "CUDAExecutionProvider", "us": 5},
             "copy": {"node": "copy", "op": "MemcpyToHost", "provider": "CUDAExecutionProvider", "us": 1},
             "topk": {"node": "topk", "op": "NonMaxSuppression", "provider": "CPUExecutionProvider", "us": 9}}
    report = placement_report(nodes, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert report["fell_back"] == [{"node": "topk", "op": "NonMaxSuppression", "provider": "CPUExecutionProvider"}]
    assert report["memcpy_nodes"] == 1
    assert report["nodes_per_provider"] == {"CUDAExecutionProvider": 2, "CPUExecutionProvider": 1}


def test_a_runtime_error_reads_as_a_sentence_without_onnxruntime_internals():
    from edgepipe.runtime.engine import runtime_message

    broadcast = RuntimeError(
        "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Non-zero status code returned while running Add node. "
        "Name:'/embeddings/Add' Status Message: /onnxruntime_src/onnxruntime/core/providers/cpu/math/"
        "element_wise_ops.h:583 void onnxruntime::BroadcastIterator::Append(ptrdiff_t, ptrdiff_t) axis == 1 || "
        "axis == largest was false. Attempting to broadcast an axis by a dimension other than 1. 5 by 7\n"
        "second line")
    assert runtime_message(broadcast) == ("Add node '/embeddings/Add': axis == 1 || axis == largest was false. "
                                          "Attempting to broadcast an axis by a dimension other than 1. 5 by 7")
    assert runtime_message(ValueError("")) == "ValueError"


def test_a_backend_is_one_class_behind_the_engine(tmp_path, monkeypatch):
    """The Engine holds a backend and asks it for sessions and features; it never branches on the
    backend's name, so a runtime registered in `backends.BACKENDS` runs like the built-in ones."""
    import onnx
    from onnx import TensorProto, helper

    from edgepipe.runtime import backends

    weight = np.arange(8, dtype=np.float32).reshape(4, 2)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])],
                              [onnx.numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(tmp_path / "mm.onnx"))
    made = []

    class Recording(backends.OnnxruntimeBackend):
        name = "recording"
        features = frozenset()

        def new_session(self, threads, spinning):
            made.append(threads)
            return super().new_session(threads, spinning)

    monkeypatch.setitem(backends.BACKENDS, "recording", Recording)
    monkeypatch.setattr(backends, "NAMES", (*backends.NAMES, "recording"))
    engine = Engine(tmp_path / "mm.onnx", backend="recording",
                    batch_sessions={1: {"threads": 1, "spinning": False}, 32: {"threads": 2, "spinning": False}})
    x = np.ones((3, 4), np.float32)
    np.testing.assert_allclose(engine.run({"x": x})["y"], x @ weight)
    assert engine.backend == "recording" and sorted(made) == [1, 2]  # one session per setting
    with pytest.raises(InputError, match=r"run_bound \(IO binding\) is an onnxruntime feature; this Engine runs on "
                                         r"recording"):
        engine.run_bound({"x": x}, device="cpu")
    with pytest.raises(InputError, match="unknown backend 'nope'; choose one of onnxruntime, openvino, recording"):
        Engine(tmp_path / "mm.onnx", backend="nope")
