"""The direct dynamic INT8 writer against onnxruntime.quantization.quantize_dynamic: the same
integers, scales and zero points, the same outputs, and quantize_dynamic wherever it does not apply."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgepipe.quantize import dynamic_matmul
from edgepipe.quantize.recipes import Recipe
from edgepipe.quantize.rewrites import gemms_as_matmul


def _model(path: Path) -> Path:
    """x -> MatMul(W) + b (an Add the kernel can take); x -> MatMul(W2) (x shared by two
    quantized MatMuls); relu -> Gemm(transB, bias) ; an all-zero weight column; an
    activation x activation MatMul; and a MatMul named 'keep' for exclusion."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    w[:, 3] = 0.0  # a zero column: scale 1, as onnxruntime sets it
    w[0, 5] = 40.0  # one outlier column
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b"),
             numpy_helper.from_array(rng.standard_normal((64, 16)).astype(np.float32) * 0.01, "W2"),
             numpy_helper.from_array(rng.standard_normal((8, 32)).astype(np.float32), "G"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "c"),
             numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "K")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y0"], name="mm"),
             helper.make_node("Add", ["y0", "b"], ["y1"], name="bias"),
             helper.make_node("MatMul", ["x", "W2"], ["z"], name="mm2"),
             helper.make_node("Relu", ["y1"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "G", "c"], ["g"], name="gemm", transB=1),
             helper.make_node("MatMul", ["g", "K"], ["k"], name="keep"),
             helper.make_node("Transpose", ["g"], ["gt"], name="t"),
             helper.make_node("MatMul", ["k", "gt"], ["a"], name="act_x_act")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 16]),
                               helper.make_tensor_value_info("k", TensorProto.FLOAT, ["n", 8]),
                               helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", "n"])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


def _run(path: Path, x: np.ndarray) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("reduce_range", [False, True])
def test_the_same_integers_and_outputs_as_quantize_dynamic(tmp_path, per_channel, reduce_range):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source = _model(tmp_path / "m.onnx")
    mine = tmp_path / "mine.onnx"
    assert dynamic_matmul.quantize_matmuls(source, mine, per_channel, reduce_range, {"keep"}) == 3
    as_matmul = tmp_path / "as_matmul.onnx"  # what the quantize_dynamic route builds from
    assert gemms_as_matmul(source, as_matmul) == 1
    theirs = tmp_path / "theirs.onnx"
    quantize_dynamic(str(as_matmul), str(theirs), weight_type=QuantType.QInt8, per_channel=per_channel,
                     reduce_range=reduce_range, op_types_to_quantize=["MatMul"], nodes_to_exclude=["keep", "act_x_act"])

    ours = {i.name: numpy_helper.to_array(i) for i in onnx.load(mine).graph.initializer}
    ref = {i.name: numpy_helper.to_array(i) for i in onnx.load(theirs).graph.initializer}
    names = [f"{w}_{part}" for w in ("W", "W2", "G_as_matmul") for part in ("quantized", "scale", "zero_point")]
    for name in names:
        assert ours[name].dtype == ref[name].dtype and ours[name].shape == ref[name].shape, name
        np.testing.assert_array_equal(ours[name], ref[name], err_msg=name)
    assert ours["W_scale"].shape == ((32,) if per_channel else ())
    if per_channel:
        assert ours["W_scale"][3] == 1.0  # the zero column

    graph = onnx.load(mine).graph
    ops = [n.op_type for n in graph.node]
    # x feeds two quantized MatMuls: one shared DynamicQuantizeLinear; the bias went into the kernel
    assert ops.count("DynamicQuantizeLinear") == 1 and ops.count("MatMulIntegerToFloat") == 2
    assert ops.count("DynamicQuantizeMatMul") == 1 and "Add" not in ops and "W" not in ours
    assert {n.name: n.op_type for n in graph.node}["keep"] == "MatMul"  # excluded
    assert {n.name: n.op_type for n in graph.node}["act_x_act"] == "MatMul"

    x = np.random.default_rng(1).standard_normal((16, 64)).astype(np.float32)
    for a, b in zip(_run(mine, x), _run(theirs, x)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_what_it_does_not_write_goes_to_quantize_dynamic(tmp_path):
    source = _model(tmp_path / "m.onnx")
    assert dynamic_matmul.applies(source, Recipe("dynamic", weight_type="S8"))
    assert not dynamic_matmul.applies(source, Recipe("dynamic", weight_type="U8"))
    assert not dynamic_matmul.applies(source, Recipe("static", weight_type="S8"))
    assert not dynamic_matmul.applies(source, Recipe("dynamic", weight_type="S8", op_types_to_exclude=("Gemm",)))

    model = onnx.load(source)  # a 3-D weight: not this writer's
    model.graph.initializer.append(numpy_helper.from_array(np.ones((2, 8, 8), np.float32), "W3"))
    model.graph.node.append(helper.make_node("MatMul", ["k", "W3"], ["w3"], name="three_d"))
    model.graph.output.append(helper.make_tensor_value_info("w3", TensorProto.FLOAT, None))
    onnx.save(model, tmp_path / "w3.onnx")
    assert not dynamic_matmul.applies(tmp_path / "w3.onnx", Recipe("dynamic", weight_type="S8"))
    assert dynamic_matmul.applies(tmp_path / "w3.onnx",
                                  Recipe("dynamic", weight_type="S8", nodes_to_exclude=("three_d",)))
    with pytest.raises(ValueError):
        dynamic_matmul.quantize_matmuls(tmp_path / "w3.onnx", tmp_path / "out.onnx", False, False)
