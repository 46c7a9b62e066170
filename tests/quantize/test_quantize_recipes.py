"""Which recipes a graph and a CPU get: vetoes, types from the CPU's ISA, build order, and the
rewrites that make a recipe fit (Gemm as MatMul, output QDQ, a patch-embedding Conv)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from quantize_common import ARM, AVX2_ONLY, VNNI_X86, eval_sets

from edgepipe.errors import LatencyError
from edgepipe.quantize import (
    QuantizeConfig,
    builders,
    candidate_recipes,
    quantize,
    rewrites,
)
from edgepipe.quantize.recipes import Recipe
from edgepipe.runtime import Engine


def test_dynamic_conv_is_never_a_candidate():
    recipes, skipped = candidate_recipes({"Conv", "Relu", "Gemm"}, VNNI_X86)
    assert recipes and all(r.method == "static" for r in recipes)
    assert any("ConvInteger" in s["why"] for s in skipped)


def test_dynamic_quantizes_linear_layers_exported_as_gemm(zoo, tmp_path):
    # torch exports nn.Linear on 2-D input as Gemm, which onnxruntime's dynamic quantizer skips:
    # without the MatMul rewrite the dynamic recipe quantized nothing in an MLP.
    import onnx

    src = zoo["mlp"].onnx
    gemms = [n.name for n in onnx.load(str(src)).graph.node if n.op_type == "Gemm"]
    assert gemms
    rewritten = tmp_path / "as_matmul.onnx"
    assert rewrites.gemms_as_matmul(src, rewritten) == len(gemms)
    graph = onnx.load(str(rewritten)).graph
    assert not any(n.op_type == "Gemm" for n in graph.node)
    assert {n.name for n in graph.node if n.op_type == "MatMul"} == set(gemms)  # exclusions still apply
    x = zoo["mlp"].dataset.x_test[:16]
    (mine,), (ref,) = Engine(rewritten).run(x).values(), Engine(src).run(x).values()
    np.testing.assert_allclose(mine, ref, rtol=1e-5, atol=1e-5)
    out = tmp_path / "dyn.onnx"
    builders.build(Recipe("dynamic", weight_type="S8"), src, out, None, 0)
    assert builders.count_integer_nodes(out) >= len(gemms)
    kept = tmp_path / "dyn_excl.onnx"
    builders.build(Recipe("dynamic", weight_type="S8", nodes_to_exclude=(gemms[0],)), src, kept, None, 0)
    assert builders.count_integer_nodes(kept) < builders.count_integer_nodes(out)


def test_lstm_gets_dynamic_only():
    recipes, skipped = candidate_recipes({"Gather", "LSTM", "Gemm"}, VNNI_X86)
    assert recipes and all(r.method == "dynamic" for r in recipes)
    assert any("does not quantize LSTM" in s["why"] for s in skipped)


@pytest.mark.parametrize("cpu, act, reduce_range", [(VNNI_X86, "U8", False), (AVX2_ONLY, "U8", True),
                                                    (ARM, "S8", False)])
def test_cpu_features_decide_types_and_reduce_range(cpu, act, reduce_range):
    recipes, _ = candidate_recipes({"MatMul", "Gemm"}, cpu)
    static = [r for r in recipes if r.method == "static"]
    assert static and all(r.activation_type == act and r.weight_type == "S8" for r in static)
    assert any(r.reduce_range for r in recipes) == reduce_range and all(r.reasons for r in recipes)
    if reduce_range:  # full-range twins of the dynamic and static per-channel QDQ recipes, measured too
        full = {r.name for r in recipes if not r.reduce_range}
        assert full == {"dynamic/WS8/per-tensor", "dynamic/WS8/per-channel", "static-QDQ/AU8WS8/minmax/per-channel"}
        assert {r.name + "/reduce-range" for r in recipes if not r.reduce_range} <= {r.name for r in recipes}
    else:
        assert all(not r.reduce_range for r in recipes)


def test_quantize_without_vnni_uses_reduce_range(zoo, tmp_path):
    eval_data, calibration = eval_sets(zoo["mlp"])
    try:
        result = quantize(zoo["mlp"].onnx, tmp_path / "m.onnx", QuantizeConfig(batch_sizes=(32,)),
                          eval_data=eval_data, calibration=calibration, cpu=AVX2_ONLY)
        record = result.record
    except LatencyError as exc:  # on this (VNNI) machine 7-bit kernels may not pay off: still recorded
        record = exc.report.to_dict()
    assert record["cpu"]["vnni"] is False
    assert "reduce_range" in record["recipe_reason"]
    ranges = {c["recipe"]: c["reduce_range"] for c in record["candidates"]}
    assert ranges["static-QDQ/AU8WS8/minmax/per-tensor/reduce-range"]
    assert not ranges["static-QDQ/AU8WS8/minmax/per-channel"]


def test_build_order_puts_the_likeliest_winners_first():
    conv, _ = candidate_recipes({"Conv", "Relu"}, AVX2_ONLY)
    assert conv[0].name == "static-QDQ/AU8WS8/minmax/per-channel"
    assert conv[1] == replace(conv[0], bias_correction=True)  # built right after, from its file
    assert conv[1].name == "static-QDQ/AU8WS8/minmax/per-channel/bias-corrected"
    matmul, _ = candidate_recipes({"MatMul", "Add"}, AVX2_ONLY, largest_matmul_weight=1 << 20)
    assert [r.name for r in matmul[:2]] == ["dynamic/WS8/per-channel", "dynamic/WS8/per-tensor"]
    assert [r.reduce_range for r in matmul[:4]] == [False, False, True, True]
    assert QuantizeConfig().time_budget_s == 25 and QuantizeConfig(time_budget_s=0).time_budget_s is None
    # a transformer with a Conv patch embedding (ViT) is not a convolutional graph
    vit, _ = candidate_recipes({"Conv", "MatMul"}, AVX2_ONLY, conv_heavy=False)
    assert vit[0].name == "dynamic/WS8/per-channel"


def test_only_matmul_and_gemm_outputs_lose_their_output_qdq(tmp_path):
    """ORT has float-output integer kernels for MatMul/Gemm, not for Conv: a Conv writing a graph
    output keeps its Q/DQ so it is fused to QLinearConv instead of running in float."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def qdq_model(op: str, weight_shape, x_shape, y_shape):
        rng = np.random.default_rng(0)
        scale, zero = numpy_helper.from_array(np.float32(0.1), "s"), numpy_helper.from_array(np.uint8(128), "z")
        weight = numpy_helper.from_array(rng.standard_normal(weight_shape).astype(np.float32), "W")
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
                 helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
                 helper.make_node(op, ["xd", "W"], ["h"], name="compute"),
                 helper.make_node("QuantizeLinear", ["h", "s", "z"], ["hq"]),
                 helper.make_node("DequantizeLinear", ["hq", "s", "z"], ["y"])]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
                                  [scale, zero, weight])
        path = tmp_path / f"{op}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
        return path

    matmul = qdq_model("MatMul", (8, 4), [2, 8], [2, 4])
    assert rewrites.float_graph_outputs(matmul) == ["compute"]
    assert [n.op_type for n in onnx.load(str(matmul)).graph.node][-1] == "MatMul"
    conv = qdq_model("Conv", (4, 3, 1, 1), [1, 3, 5, 5], [1, 4, 5, 5])
    assert rewrites.float_graph_outputs(conv) == []
    assert [n.op_type for n in onnx.load(str(conv)).graph.node][-1] == "DequantizeLinear"


def test_dynamic_leaves_a_patch_embedding_conv_in_fp32_and_quantizes_the_matmuls(tmp_path):
    """ViT-like: one Conv (patch embedding) and MatMuls. Dynamic is a candidate there (a veto
    on any Conv left ViT-base with static QDQ only, which lost 7 of 64 rows), and its ConvInteger
    never appears."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 3, 4, 4)).astype(np.float32), "P"),
             numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "W2"),
             numpy_helper.from_array(np.array([0, 64, 16], dtype=np.int64), "shape")]
    nodes = [helper.make_node("Conv", ["x", "P"], ["p"], strides=[4, 4], name="patch"),
             helper.make_node("Reshape", ["p", "shape"], ["t"]),
             helper.make_node("Transpose", ["t"], ["s"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["s", "W1"], ["h"], name="mm1"),
             helper.make_node("MatMul", ["h", "W2"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "vit",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16, 64])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "vit.onnx")
    recipes, skipped = candidate_recipes({n.op_type for n in nodes}, AVX2_ONLY, conv_heavy=False)
    dynamic = [r for r in recipes if r.method == "dynamic"]
    assert dynamic and not any("ConvInteger" in s["why"] for s in skipped)
    builders.build(dynamic[0], tmp_path / "vit.onnx", tmp_path / "dyn.onnx", None, 0)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "dyn.onnx")).graph.node]
    assert "ConvInteger" not in ops and "Conv" in ops and builders.count_integer_nodes(tmp_path / "dyn.onnx") >= 2
