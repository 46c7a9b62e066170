"""The symmetric every-MatMul QDQ layout for OpenVINO (edgepipe.quantize.static_matmul): what it
writes, that it stays faithful, that its ranges are reused, and that OpenVINO runs it faster than
onnxruntime.quantization's asymmetric layout of the same model."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from quantize_common import AVX2_ONLY
from test_openvino import needs_openvino

from edgepipe.errors import QuantizationError
from edgepipe.quantize import candidate_recipes, static_matmul
from edgepipe.quantize import search as search_mod
from edgepipe.quantize.config import EvalData, QuantizeConfig
from edgepipe.quantize.evaluation import evaluate, fidelity
from edgepipe.quantize.recipes import SYMMETRIC_WITHOUT_VNNI, Recipe
from edgepipe.quantize.search import Search
from edgepipe.runtime import Engine
from edgepipe.runtime.hardware import CpuInfo, read_cpu
from edgepipe.runtime.spec import METADATA_KEY

VNNI = CpuInfo("test VNNI", "x86_64", ["avx2", "avx512f", "avx512_vnni"], 2)


def _attention(path, layers: int = 1, d: int = 32, seq: int = 16, opset: int = 17):
    """`layers` single-head attention blocks (Q, K, V projections, softmax(QK^T/sqrt(d))V, an
    output projection as a Gemm with transB, a residual Add reading the block's input and a
    constant it shares with the Q projection's bias Add), then the mean over the sequence."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def weight(name, shape, scale):
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    x = "x"
    for i in range(layers):
        p = f"l{i}_"
        bias = weight(p + "bias", (d,), 0.1)
        nodes += [helper.make_node("MatMul", [x, weight(p + "Wq", (d, d), d ** -0.5)], [p + "q0"], name=p + "q"),
                  helper.make_node("Add", [p + "q0", bias], [p + "q1"], name=p + "q_bias"),
                  helper.make_node("MatMul", [x, weight(p + "Wk", (d, d), d ** -0.5)], [p + "k"], name=p + "k"),
                  helper.make_node("MatMul", [x, weight(p + "Wv", (d, d), d ** -0.5)], [p + "v"], name=p + "v"),
                  helper.make_node("Transpose", [p + "k"], [p + "kt"], perm=[0, 2, 1], name=p + "kt"),
                  helper.make_node("MatMul", [p + "q1", p + "kt"], [p + "s0"], name=p + "scores"),
                  helper.make_node("Mul", [p + "s0", p + "scale"], [p + "s1"], name=p + "scale"),
                  helper.make_node("Softmax", [p + "s1"], [p + "a"], axis=-1, name=p + "softmax"),
                  helper.make_node("MatMul", [p + "a", p + "v"], [p + "ctx"], name=p + "context"),
                  helper.make_node("Reshape", [p + "ctx", p + "flat"], [p + "ctx2"], name=p + "flatten"),
                  helper.make_node("Gemm", [p + "ctx2", weight(p + "Wo", (d, d), d ** -0.5)], [p + "o"],
                                   transB=1, name=p + "out"),
                  helper.make_node("Reshape", [p + "o", p + "back"], [p + "o3"], name=p + "unflatten"),
                  helper.make_node("Add", [p + "o3", x], [p + "r"], name=p + "residual"),
                  helper.make_node("Add", [p + "r", bias], [p + "y"], name=p + "shared_bias")]
        inits += [numpy_helper.from_array(np.array(d ** -0.5, np.float32), p + "scale"),
                  numpy_helper.from_array(np.array([-1, d], np.int64), p + "flat"),
                  numpy_helper.from_array(np.array([-1, seq, d], np.int64), p + "back")]
        x = p + "y"
    nodes.append(helper.make_node("ReduceMean", [x], ["logits"], axes=[1], keepdims=0, name="pool"))
    graph = helper.make_graph(nodes, "attention",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", seq, d])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", d])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    spec = [{"name": "x", "dtype": "float32", "shape": ["batch", seq, d], "low": None, "high": None, "example": {}}]
    helper.set_model_props(model, {METADATA_KEY: json.dumps(spec)})
    onnx.save(model, path)
    return path


def _data(rows: int = 24, seq: int = 16, d: int = 32, seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((rows, seq, d)).astype(np.float32)}


def test_every_matmul_reads_zero_point_free_inputs_and_stays_faithful(tmp_path):
    src = _attention(tmp_path / "attn.onnx")
    out = tmp_path / "attn.q.onnx"
    assert static_matmul.quantize(src, out, _data(), samples=16) == 6  # q, k, v, scores, context, the Gemm
    model = onnx.load(str(out))
    graph = model.graph
    made = {o: n for n in graph.node for o in n.output}
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in (n for n in graph.node if n.op_type in ("MatMul", "Gemm")):
        feeders = [made.get(i) for i in node.input[:2]]
        assert all(f is not None and f.op_type == "DequantizeLinear" for f in feeders), node.name
        for f in feeders:
            assert not inits[f.input[2]].any(), f"{f.name}: zero point must be 0"
    dq = {n.output[0]: n for n in graph.node if n.op_type == "DequantizeLinear"}
    by_name = {n.name: n for n in graph.node}
    # softmax's output is never negative: U8 (all 256 steps used); the others S8
    probs = dq[by_name["l0_context"].input[0]]
    assert inits[probs.input[2]].dtype == np.uint8
    assert inits[dq[by_name["l0_scores"].input[0]].input[2]].dtype == np.int8
    # weights: int8 per output channel (MatMul [K, N]: axis 1; Gemm with transB [N, K]: axis 0)
    axes = {n.name: {a.name: a.i for a in n.attribute}.get("axis") for n in dq.values()}
    assert axes[dq[by_name["l0_q"].input[1]].name] == 1 and axes[dq[by_name["l0_out"].input[1]].name] == 0
    assert inits[dq[by_name["l0_q"].input[1]].input[0]].dtype == np.int8
    assert inits[dq[by_name["l0_q"].input[1]].input[1]].shape == (32,)
    # the bias the residual Add shares with the Q projection stays; the float weights are gone
    assert "l0_bias" in inits and "l0_Wq" not in inits and "l0_Wo" not in inits
    feeds = _data(rows=8, seed=2)
    reference = Engine(src).run(feeds)["logits"]
    got = Engine(out).run(feeds)["logits"]
    assert fidelity(got, reference)["rel_l2"] < 0.03


def test_ranges_are_calibrated_once_and_excluded_nodes_stay_float(tmp_path, monkeypatch):
    src = _attention(tmp_path / "attn.onnx")
    calls = []
    real = static_matmul.activation_ranges
    monkeypatch.setattr(static_matmul, "activation_ranges", lambda *a, **k: calls.append(1) or real(*a, **k))
    static_matmul.quantize(src, tmp_path / "a.onnx", _data(), samples=16)
    assert static_matmul.quantize(src, tmp_path / "b.onnx", _data(), samples=16, excluded={"l0_scores"}) == 5
    assert len(calls) == 1  # the second build read the cached ranges
    graph = onnx.load(str(tmp_path / "b.onnx")).graph
    made = {o: n.op_type for n in graph.node for o in n.output}
    scores = next(n for n in graph.node if n.name == "l0_scores")
    assert [made.get(i) for i in scores.input] == ["Add", "Transpose"]
    assert not list(tmp_path.glob("ranges-calibration.onnx*"))  # the calibration model is removed


def test_the_reference_pass_measures_the_ranges_a_calibration_pass_would(tmp_path, monkeypatch):
    """reference_with_ranges runs FP32 once over the held-out rows for both the reference and
    the symmetric layout's calibration; a build given those ranges runs no calibration."""
    src = _attention(tmp_path / "attn.onnx", layers=2)
    data = EvalData(_data(rows=24))
    tapped = static_matmul.reference_with_ranges(src, data, tmp_path, providers="cpu")
    np.testing.assert_allclose(tapped.output, evaluate(Engine(src), data)[0], rtol=1e-5, atol=1e-6)
    assert tapped.inputs[0].name == "x" and tapped.providers == ["CPUExecutionProvider"]
    assert not list(tmp_path.glob("reference-ranges.onnx*"))  # the tapped copy is removed
    names = tapped.ranges.names
    assert len(names) == 12  # per block: x (Q, K and V read it), q, k^T, v, softmax, the Gemm's input
    calibrated = static_matmul.activation_ranges(onnx.load(str(src)), names, data.inputs, 24, tmp_path, 5)
    assert tapped.ranges.rows == calibrated.rows == 24
    assert set(tapped.ranges.values) == set(calibrated.values) == set(names)
    for name, seen in calibrated.values.items():
        np.testing.assert_allclose(tapped.ranges.values[name], seen, rtol=1e-5, atol=1e-6, err_msg=name)
    calls = []
    real = static_matmul.activation_ranges
    monkeypatch.setattr(static_matmul, "activation_ranges", lambda *a, **k: calls.append(1) or real(*a, **k))
    for sub, samples in (("all", 256), ("fewer", 16)):  # 16 of 24 rows: not what was measured
        (tmp_path / sub).mkdir()
        assert static_matmul.quantize(src, tmp_path / sub / "q.onnx", data.inputs, samples,
                                      measured=tapped.ranges) == 12
        assert len(calls) == (0 if sub == "all" else 1), sub
    feeds = _data(rows=8, seed=2)
    got = Engine(tmp_path / "all" / "q.onnx").run(feeds)["logits"]
    assert fidelity(got, Engine(src).run(feeds)["logits"])["rel_l2"] < 0.05
    # weights in an external-data file: the tapped copy (in another folder) gets them too
    split = tmp_path / "split" / "attn.onnx"
    split.parent.mkdir()
    onnx.save_model(onnx.load(str(src)), str(split), save_as_external_data=True, location="attn.onnx.data",
                    size_threshold=0)
    again = static_matmul.reference_with_ranges(split, data, tmp_path, providers="cpu")
    np.testing.assert_allclose(again.output, tapped.output, rtol=1e-6, atol=1e-7)
    for name, seen in tapped.ranges.values.items():
        np.testing.assert_allclose(again.ranges.values[name], seen, rtol=1e-6, err_msg=name)
    assert not list(tmp_path.glob("reference-ranges.onnx*"))


def test_the_search_calibrates_in_its_reference_pass_and_falls_back_when_that_fails(tmp_path, monkeypatch):
    src = _attention(tmp_path / "attn.onnx")
    data = EvalData(_data(rows=24))
    config = QuantizeConfig(batch_sizes=(8,), time_budget_s=0, backends=("onnxruntime",))
    monkeypatch.setattr(static_matmul, "activation_ranges", lambda *a, **k: pytest.fail("calibrated twice"))
    search = Search(src, config, data, data, tmp_path, lambda message: None, tap_ranges=True)
    assert search.calibration.ranges.covers(search.calibration.ranges.names, 24)
    assert search.eval_data.ranges is None  # the held-out rows themselves are left as given
    search.sources = [src]
    cand = search.build(Recipe("static", "QDQ", "S8", "S8", per_channel=True, symmetric=True))
    assert cand.error is None and cand.agreement >= 0.9, cand.error
    # a file the tapped pass cannot load: None, and the search takes the plain reference (its
    # build would then calibrate on its own)
    assert static_matmul.reference_with_ranges(tmp_path / "missing.onnx", data, tmp_path) is None
    monkeypatch.setattr(search_mod, "reference_with_ranges", lambda *a, **k: None)
    said = []
    search = Search(src, config, data, data, tmp_path, said.append, tap_ranges=True)
    assert search.calibration.ranges is None and len(search.reference) == 24
    assert said == ["the reference pass could not measure activation ranges: the every-MatMul build calibrates"]


def test_an_opset_without_per_channel_dequantize_is_refused(tmp_path):
    src = _attention(tmp_path / "attn.onnx", opset=11)
    with pytest.raises(QuantizationError, match="opset 11: per-channel QDQ needs 13"):
        static_matmul.quantize(src, tmp_path / "q.onnx", _data(), samples=8)


def test_openvino_gets_the_symmetric_layout_on_matmul_graphs_and_the_twin_on_cnns():
    ops = {"MatMul", "Softmax", "Add", "Gemm"}
    recipes, _ = candidate_recipes(ops, VNNI, backends=("onnxruntime", "openvino"))
    ov = [r for r in recipes if r.backend == "openvino"]
    assert len(ov) == 1 and ov[0].symmetric and ov[0].name.startswith("static-QDQ/symmetric")
    assert recipes[0] is ov[0]  # VNNI: the likeliest winner is built first
    # no VNNI: OpenVINO's INT8 MatMul saturates on signed activations: not a candidate, and said so
    recipes, skipped = candidate_recipes(ops, AVX2_ONLY, backends=("onnxruntime", "openvino"))
    assert recipes[0].method == "dynamic" and not any(r.backend == "openvino" for r in recipes)
    assert [s["why"] for s in skipped if "symmetric" in s["recipe"]] == [SYMMETRIC_WITHOUT_VNNI]
    cnn, _ = candidate_recipes({"Conv", "Relu", "Gemm"}, VNNI, backends=("onnxruntime", "openvino"))
    assert [(r.symmetric, r.bias_correction) for r in cnn if r.backend == "openvino"] == [(False, False), (False, True)]
    plain, _ = candidate_recipes(ops, VNNI, backends=("onnxruntime",))
    assert not any(r.symmetric for r in plain)


@needs_openvino
@pytest.mark.slow  # two builds and an interleaved timing
def test_openvino_runs_the_symmetric_layout_faster_than_the_asymmetric_one(tmp_path):
    if not read_cpu().has_vnni:  # no candidate there (SYMMETRIC_WITHOUT_VNNI); with oneDNN capped at AVX2: 1.10x
        pytest.skip("the symmetric layout is no candidate on a CPU without VNNI")
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from edgepipe.quantize.calibration import ArrayCalibrationReader
    from edgepipe.runtime import measure_interleaved

    d, seq = 256, 128
    src = _attention(tmp_path / "attn.onnx", layers=4, d=d, seq=seq)
    data = _data(rows=16, seq=seq, d=d)
    sym, asym = tmp_path / "sym.onnx", tmp_path / "asym.onnx"
    static_matmul.quantize(src, sym, data, samples=16)
    quantize_static(str(src), str(asym), ArrayCalibrationReader(data, 16, batch_size=4), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                    op_types_to_quantize=["MatMul", "Gemm"])
    engines = {k: Engine(p, backend="openvino") for k, p in (("sym", sym), ("asym", asym))}
    feeds = _data(rows=8, seq=seq, d=d, seed=3)
    stats = measure_interleaved({k: e.runner(feeds) for k, e in engines.items()}, 8, rounds=10)
    ratio = stats["asym"].p50_ms / stats["sym"].p50_ms
    counts = Counter(n.op_type for n in onnx.load(str(sym)).graph.node)
    print(f"asymmetric / symmetric p50 on OpenVINO: {ratio:.2f}x")
    assert ratio >= 1.1, (f"symmetric {stats['sym'].p50_ms:.2f} ms vs asymmetric {stats['asym'].p50_ms:.2f} ms "
                          f"({counts})")
