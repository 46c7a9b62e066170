"""Bias correction of static QDQ Convs and Gemms (quantize/bias_correction.py), and its place in
the search: a twin of each static per-channel QDQ recipe on convolutional graphs, built from its
base's file, timed as it, and shipped only when more faithful."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

from edgepipe.errors import QuantizationError
from edgepipe.quantize import QuantizeConfig, candidate_recipes
from edgepipe.quantize.bias_correction import correct_biases, correctable
from edgepipe.quantize.calibration import ArrayCalibrationReader
from edgepipe.quantize.config import EvalData
from edgepipe.quantize.recipes import Recipe
from edgepipe.quantize.rewrites import float_graph_outputs
from edgepipe.quantize.search import Search
from edgepipe.quantize.twins import kernel_signature
from edgepipe.runtime import Engine
from edgepipe.runtime.hardware import CpuInfo

AVX2_ONLY = CpuInfo("fake AVX2 host", "x86_64", ["avx2", "fma"], 2)
VNNI = CpuInfo("fake Xeon", "x86_64", ["avx2", "avx512f", "avx512_vnni"], 2)


def _save(nodes, inits, x_shape, path):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def _outliers(shape, rng, at):
    """Weights with one outlier per output channel: coarse per-channel steps, so rounding shifts
    each output's mean visibly."""
    w = rng.standard_normal(shape).astype(np.float32) * 0.1
    w[(slice(None), *at)] = 2.0
    return w


def _conv_net(path, rng, bias=True):
    """A strided, padded 3x3 Conv and a depthwise 3x3 one."""
    # b1 spreads the depthwise Conv's input channels' means apart (0 to 2): a shift read from
    # another channel's windows is visibly wrong
    b = [numpy_helper.from_array(np.linspace(0.0, 2.0, 8, dtype=np.float32), "b1"),
         numpy_helper.from_array(np.full(8, 0.1, np.float32), "b2")]
    inits = [numpy_helper.from_array(_outliers((8, 4, 3, 3), rng, (0, 0, 0)), "w1"),
             numpy_helper.from_array(_outliers((8, 1, 3, 3), rng, (0, 1, 1)), "w2"), *(b if bias else [])]
    nodes = [helper.make_node("Conv", ["x", "w1", *(["b1"] if bias else [])], ["c1"], name="conv1",
                              kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
             helper.make_node("Conv", ["r1", "w2", *(["b2"] if bias else [])], ["y"], name="conv2",
                              kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=8)]
    return _save(nodes, inits, ["n", 4, 16, 16], path)


def _gemm_net(path, rng):
    """Two Gemms: one with transB (weight [N, K]), one without ([K, N])."""
    inits = [numpy_helper.from_array(_outliers((16, 12), rng, (0,)), "w1"),
             numpy_helper.from_array(np.zeros(16, np.float32), "b1"),
             numpy_helper.from_array(np.ascontiguousarray(_outliers((6, 16), rng, (0,)).T), "w2"),
             numpy_helper.from_array(np.full(6, 0.1, np.float32), "b2")]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["g1"], name="gemm1", transB=1),
             helper.make_node("Relu", ["g1"], ["r1"], name="relu"),
             helper.make_node("Gemm", ["r1", "w2", "b2"], ["y"], name="gemm2")]
    return _save(nodes, inits, ["n", 12], path)


def _quantized(src, x, out):
    quantize_static(str(src), str(out), ArrayCalibrationReader({"x": x}, 64, 8), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    return out


def _mean_error(path, x, reference) -> float:
    """The largest per-channel mean error of the output against FP32's."""
    out = Engine(path).run(x)["y"] - reference
    return float(np.abs(out.mean(axis=tuple(i for i in range(out.ndim) if i != 1))).max())


@pytest.mark.parametrize("net,shape", [(_conv_net, (32, 4, 16, 16)), (_gemm_net, (64, 12))])
def test_the_corrected_biases_remove_the_mean_shift_of_the_rounded_weights(tmp_path, net, shape):
    rng = np.random.default_rng(0)
    src = net(tmp_path / "net.onnx", rng)
    x = (rng.standard_normal(shape) + 0.5).astype(np.float32)  # non-zero means: a visible shift
    qdq, fixed = _quantized(src, x, tmp_path / "net.q.onnx"), tmp_path / "net.bc.onnx"
    assert correct_biases(qdq, src, {"x": x}, len(x), fixed, tmp_path) == 2
    assert not list(tmp_path.glob("bias-correction.onnx*"))
    reference = Engine(src).run(x)["y"]
    before, after = _mean_error(qdq, x, reference), _mean_error(fixed, x, reference)
    print(f"largest per-channel mean error: {before:.5f} -> {after:.5f}")
    assert after < before / 3
    assert kernel_signature(fixed, "onnxruntime") == kernel_signature(qdq, "onnxruntime")  # values only


def test_a_model_without_biases_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    src = _conv_net(tmp_path / "net.onnx", rng, bias=False)
    x = rng.standard_normal((8, 4, 16, 16)).astype(np.float32)
    qdq = _quantized(src, x, tmp_path / "q.onnx")
    assert correctable(qdq, src) == 0  # the search skips such a twin instead of building it
    with pytest.raises(QuantizationError, match="no quantized Conv or Gemm with a bias"):
        correct_biases(qdq, src, {"x": x}, 8, tmp_path / "bc.onnx", tmp_path)
    with_biases = _conv_net(tmp_path / "biased.onnx", rng)
    assert correctable(_quantized(with_biases, x, tmp_path / "qb.onnx"), with_biases) == 2


def _classifier_net(path, rng):
    """A Conv without a bias, global pooling and a Gemm classifier without one: the layout of
    the benchmark's random-weight CNNs, whose biases the exporter dropped."""
    inits = [numpy_helper.from_array(_outliers((8, 4, 3, 3), rng, (0, 0, 0)), "w1"),
             numpy_helper.from_array(_outliers((5, 8), rng, (0,)), "w2"),
             numpy_helper.from_array(np.array([-1, 8], np.int64), "shape")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r1"], ["p1"], name="pool"),
             helper.make_node("Reshape", ["p1", "shape"], ["f1"], name="flatten"),
             helper.make_node("Gemm", ["f1", "w2"], ["y"], name="classifier", transB=1)]
    return _save(nodes, inits, ["n", 4, 16, 16], path)


def test_a_classifier_without_a_bias_gets_one_matching_fp32s_mean_logits(tmp_path):
    """The layers that write a graph output have their output means matched to FP32's on the
    corrected model's own pass: every layer's rounding before them adds up there, and a classifier
    without a bias (MobileNetV2's, as exported) gets one."""
    rng = np.random.default_rng(2)
    src = _classifier_net(tmp_path / "net.onnx", rng)
    x = (rng.standard_normal((64, 4, 16, 16)) + 0.5).astype(np.float32)
    qdq, fixed = _quantized(src, x, tmp_path / "net.q.onnx"), tmp_path / "net.bc.onnx"
    float_graph_outputs(qdq)  # as the builders leave it: the classifier writes the graph output
    assert correctable(qdq, src) == 1  # no layer has a bias, but the classifier writes the output
    assert correct_biases(qdq, src, {"x": x}, len(x), fixed, tmp_path) == 1
    classifier = next(n for n in onnx.load(str(fixed)).graph.node if n.op_type == "Gemm")
    assert len(classifier.input) == 3
    reference = Engine(src).run(x)["y"]
    before, after = _mean_error(qdq, x, reference), _mean_error(fixed, x, reference)
    print(f"largest mean error of a logit: {before:.5f} -> {after:.5f}")
    assert after < before / 3
    assert kernel_signature(fixed, "openvino") == kernel_signature(qdq, "openvino")  # a bias is not a kernel


def test_only_static_per_channel_qdq_recipes_of_convolutional_graphs_get_a_corrected_twin():
    for cpu in (AVX2_ONLY, VNNI):
        recipes, _ = candidate_recipes({"Conv", "Relu", "Gemm"}, cpu, backends=("onnxruntime", "openvino"))
        corrected = [r for r in recipes if r.bias_correction]
        bases = [r for r in recipes if r.method == "static" and r.format == "QDQ" and r.per_channel
                 and not r.bias_correction]
        assert len(corrected) == len(bases) >= 2  # onnxruntime's and OpenVINO's (reduce_range's too on AVX2)
        for r in corrected:  # each right behind its base, the file it corrects
            assert recipes[recipes.index(r) - 1] == replace(r, bias_correction=False)
            assert r.name == r.uncorrected.name.replace("per-channel", "per-channel/bias-corrected")
    # a transformer with a Conv patch embedding: not a convolutional graph
    vit, _ = candidate_recipes({"Conv", "MatMul"}, VNNI, conv_heavy=False, backends=("onnxruntime", "openvino"))
    assert not any(r.bias_correction for r in vit)


def test_the_search_corrects_its_base_file_and_times_it_as_its_twin(tmp_path):
    rng = np.random.default_rng(1)
    src = _conv_net(tmp_path / "net.onnx", rng)
    data = EvalData({"x": (rng.standard_normal((48, 4, 16, 16)) + 0.5).astype(np.float32)})
    said = []
    search = Search(src, QuantizeConfig(batch_sizes=(8,), time_budget_s=0, backends=("onnxruntime",)),
                    data, data, tmp_path, said.append)
    search.sources = [src]
    plain = search.build(Recipe("static", "QDQ", "U8", "S8", per_channel=True))
    corrected = search.build(replace(plain.recipe, bias_correction=True))
    assert corrected.error is None, corrected.error
    assert said[-1] == (f"{corrected.recipe.name}: the file of {plain.recipe.name}, its biases corrected")
    assert corrected.fidelity["rel_l2"] < plain.fidelity["rel_l2"]
    assert search.build_kind(corrected.recipe) == "bias-correction"
    # without its base's file it builds and corrects in one step, to the same biases
    alone = Search(src, search.config, data, data, tmp_path / "alone", lambda m: None)
    (tmp_path / "alone").mkdir()
    alone.sources = [src]
    again = alone.build(corrected.recipe)
    assert again.error is None and again.fidelity["rel_l2"] == pytest.approx(corrected.fidelity["rel_l2"], rel=1e-6)
