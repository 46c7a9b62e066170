"""Quantization: faster and accurate on the zoo, never slower, recipes chosen from the CPU."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from edgepipe.errors import AccuracyError, LatencyError
from edgepipe.exporters import ExportConfig, export
from edgepipe.quantize import (
    EvalData,
    QuantizeConfig,
    builders,
    candidate_recipes,
    quantize,
    rewrites,
)
from edgepipe.quantize import search as search_mod
from edgepipe.quantize import stage as stage_mod
from edgepipe.quantize.fallback import trim
from edgepipe.quantize.recipes import Recipe, activation_weight_types
from edgepipe.runtime import CpuInfo, Engine, measure_interleaved
from edgepipe.runtime.hardware import read_cpu
from edgepipe.runtime.spec import make_feeds

VNNI_X86 = CpuInfo("fake Xeon", "x86_64", ["avx2", "avx512f", "avx512_vnni"], 2)
AVX2_ONLY = CpuInfo("fake AVX2 host", "x86_64", ["avx2", "fma"], 2)
ARM = CpuInfo("fake Neoverse", "aarch64", ["neon", "arm_dotprod"], 2)

# Deployment batch sizes per zoo model: an 8x8 CNN at batch 1 is overhead-bound (INT8 ~0.9x).
DEPLOY_BATCHES = {"mlp": (1, 32), "cnn": (32,), "lstm": (1, 32), "transformer": (1, 32)}


def eval_sets(model):
    data = model.dataset
    return EvalData({data.input_name: data.x_test}, data.y_test), EvalData({data.input_name: data.x_train})


@pytest.fixture(scope="module")
def quantized(zoo, tmp_path_factory):
    out = {}
    root = tmp_path_factory.mktemp("int8")
    for name, model in zoo.items():
        eval_data, calibration = eval_sets(model)
        config = QuantizeConfig(batch_sizes=DEPLOY_BATCHES[name], max_accuracy_drop=0.01)
        out[name] = quantize(model.onnx, root / f"{name}.int8.onnx", config,
                             eval_data=eval_data, calibration=calibration)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mlp", "cnn", "lstm", "transformer"])
def test_zoo_int8_accuracy_within_budget_on_held_out_data(zoo, quantized, name):
    result = quantized[name]
    data = zoo[name].dataset
    # Re-measure independently of the stage: the written artifact, on the held-out split, run by
    # the backend the stage chose (OpenVINO runs the same QDQ file with other rounding: on the CNN
    # a clean-clone CI run measured a 1.1-point drop on onnxruntime, 0.6 on the chosen OpenVINO).
    backend = result.record["chosen"]["backend"]

    def acc(path, backend="onnxruntime"):
        logits = Engine(path, backend=backend).run(data.x_test)["logits"]
        return float((logits.argmax(-1) == data.y_test).mean())
    fp32, int8 = acc(zoo[name].onnx), acc(result.artifacts["onnx"], backend)
    assert fp32 - int8 <= 0.01, (fp32, int8)
    assert result.record["chosen"]["integer_nodes"] > 0
    assert result.artifacts["onnx"].stat().st_size < zoo[name].onnx.stat().st_size / 2


@pytest.mark.slow
def test_int8_mlp_is_faster_than_fp32_at_batch_32(zoo, quantized):
    x = np.ascontiguousarray(zoo["mlp"].dataset.x_test[:32])
    fp32 = Engine(zoo["mlp"].onnx, spinning=False)
    int8 = Engine(quantized["mlp"].artifacts["onnx"], spinning=False)
    stats = measure_interleaved({"fp32": lambda: fp32.run(x), "int8": lambda: int8.run(x)}, 32, rounds=30)
    speedup = stats["fp32"].p50_ms / stats["int8"].p50_ms
    # Measured 1.3-1.8x on a 2-core EPYC; 1.1x leaves room for a noisy neighbour.
    assert speedup > 1.1, f"INT8 {stats['int8'].p50_ms:.4f} ms vs FP32 {stats['fp32'].p50_ms:.4f} ms"


@pytest.mark.slow
def test_the_record_states_the_speedup_as_a_fraction_of_the_kernel_ceiling(zoo, quantized):
    """The chosen recipe timed on the model's heaviest kernel alone (real weights, the chosen
    session setting) at the largest batch size: "good" relative to what this CPU can do."""
    import onnx

    from edgepipe.quantize.ceiling import dominant_kernel

    for name, op in (("mlp", {"MatMul", "Gemm"}), ("cnn", {"Conv", "Gemm", "MatMul"}), ("lstm", {"LSTM"})):
        record = quantized[name].record
        ceiling = record["ceiling"]
        assert "error" not in ceiling, (name, ceiling)
        assert ceiling["op"] in op and ceiling["recipe"] == record["chosen"]["recipe"], (name, ceiling)
        batch = ceiling["batch"]
        assert ceiling["kernel_speedup"] > 0 and ceiling["input_shape"][0 if op != {"LSTM"} else 1] == batch
        assert ceiling["model_speedup"] == pytest.approx(record["chosen"]["speedup"][str(batch)], abs=1e-3)
        assert ceiling["fraction_of_ceiling"] == pytest.approx(ceiling["model_speedup"] / ceiling["kernel_speedup"],
                                                               abs=2e-3)
    node, shapes, share = dominant_kernel(onnx.load(zoo["mlp"].onnx), Engine(zoo["mlp"].onnx).inputs, 32)
    assert share > 0.5  # the 512x512 layer: 8x the 64x512 one's multiply-adds
    assert sorted(quantized["mlp"].record["ceiling"]["weight_shape"]) == [512, 512]


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
    assert ranges["static-QDQ/AU8WS8/minmax/per-tensor/reduce-range"] and not ranges["static-QDQ/AU8WS8/minmax/per-channel"]


def test_a_time_budget_bounds_the_search_and_the_record_says_what_it_skipped(zoo, tmp_path):
    eval_data, calibration = eval_sets(zoo["mlp"])
    config = QuantizeConfig(batch_sizes=(32,), time_budget_s=0.01)  # spent after the first build
    try:
        record = quantize(zoo["mlp"].onnx, tmp_path / "m.onnx", config, eval_data=eval_data,
                          calibration=calibration, cpu=AVX2_ONLY).record
    except (LatencyError, AccuracyError) as exc:  # the one candidate built may not qualify: still recorded
        record = exc.report.to_dict()
        assert "time budget left" in str(exc) and "recipe(s) untried" in str(exc) and "--time-budget 0" in str(exc)
    assert len(record["candidates"]) == 1
    budget_skips = [s for s in record["skipped_recipes"] if s["why"].startswith("time budget (0.01 s)")]
    assert len(budget_skips) >= 4  # every other recipe for an MLP on a CPU without VNNI
    assert {"build", "screen", "measure", "confirm"} <= set(record["phases"])
    assert all(v >= 0 for v in record["phases"].values())
    # the likeliest winner is built first (no Conv: dynamic, full range before reduce_range,
    # per-channel before per-tensor) ...
    assert record["candidates"][0]["recipe"] == "dynamic/WS8/per-channel"
    # ... and timing shrinks to its floor of 3 rounds instead of the configured 12 (2 for a
    # confirmation whose first figure leads by 1.2 x the 1.05x needed)
    cand = record["candidates"][0]
    first = {b: v[0] for b, v in cand["speedup_trials"].items()} if cand["speedup_trials"] else cand["speedup"]
    floor = 2 if first and all(v >= 1.2 * 1.05 for v in first.values()) else 3
    assert record["rounds"]["measure"] == 3 and record["rounds"].get("confirm", floor) == floor


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


def test_generated_rows_are_bounded_by_their_bytes_as_well_as_by_time(tmp_path):
    """A cheap model on 224x224 images got 480 generated rows (289 MB, held through the whole
    search: a fifth of MobileNetV2's peak); rows are now capped by bytes too, 32 at least."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("ReduceMean", ["x"], ["y"], axes=[2, 3], keepdims=0)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 224, 224])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])])
    path = tmp_path / "images.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), path)
    row = 3 * 224 * 224 * 4
    rows = lambda data: len(data.inputs["x"])  # noqa: E731
    assert rows(stage_mod.generated_eval_data(path, seconds=60, max_bytes=1 << 30)) == 512  # time allows all
    assert rows(stage_mod.generated_eval_data(path, seconds=60)) == (64 << 20) // row // 32 * 32 == 96
    assert rows(stage_mod.generated_eval_data(path, seconds=60, max_bytes=row)) == 32  # never fewer


def test_generated_rows_time_a_costly_model_at_batch_8_once_and_hand_both_costs_to_the_search(tmp_path):
    """Sizing the rows times FP32 at batch 1 (after a warm-up) and 8; the search reuses both
    costs. A costly model's batch-8 call gets no warm-up of its own (ViT-base: 1.7 s saved)."""
    import time as clock

    from edgepipe.runtime.spec import InputSpec
    from edgepipe.runtime.timing import WARMUP_S

    class Stand:  # an Engine whose calls cost `per_row` seconds per row
        def __init__(self, per_row):
            self.per_row, self.calls = per_row, []
            self.inputs = [InputSpec("x", "float32", ("batch", 4))]

        def runner(self, feeds):
            rows = len(feeds["x"])
            return lambda: (self.calls.append(rows), clock.sleep(self.per_row * rows))

    for per_row, warm_ups_at_8 in ((0.001, 1), (WARMUP_S / 6, 0)):
        engine, cost = Stand(per_row), {}
        data = stage_mod.generated_eval_data(tmp_path / "unused.onnx", engine=engine, call_cost=cost)
        assert engine.calls == [1, 1] + [8] * (warm_ups_at_8 + 1)
        assert set(cost) == {1, 8} and cost[8] == pytest.approx(8 * per_row, rel=0.5, abs=0.01)
        assert len(data.inputs["x"]) == (512 if per_row < 0.005 else 32)


@pytest.mark.slow  # a quantize search
def test_the_reference_takes_fp32s_first_8_rows_from_the_sizing_call(tmp_path, monkeypatch):
    """Sizing the generated rows runs FP32 at batch 8 on the first 8 of them; the search's
    reference keeps that output and runs only the other rows (ViT-base: 1.6 s saved)."""
    from edgepipe.quantize.evaluation import evaluate

    path = _tiny_mlp(tmp_path)
    engine, head = Engine(path, providers="cpu"), []
    data = stage_mod.generated_eval_data(path, engine=engine, head=head)
    full, _, _ = evaluate(engine, data)
    assert len(head) == 1 and head[0].shape == (8, 2)
    assert head[0].base is None  # its own memory: onnxruntime's outputs keep the session's arena alive
    np.testing.assert_allclose(head[0], full[:8], rtol=1e-5, atol=1e-6)  # the same rows' outputs
    ran, run = [], engine.run
    engine.run = lambda feeds, outputs=None: (ran.append(len(feeds["x"])), run(feeds, outputs))[1]
    reused, _, _ = evaluate(engine, data, head=head[0])
    assert sum(ran) == len(full) - 8
    np.testing.assert_allclose(reused, full, rtol=1e-5, atol=1e-6)

    seen, real = [], search_mod.evaluate  # and the stage hands it to the search
    monkeypatch.setattr(search_mod, "evaluate", lambda *a, head=None, **k: (
        seen.append(None if head is None else len(head)), real(*a, head=head, **k))[1])
    with pytest.raises(LatencyError):  # this MLP is slower in INT8; the reference is built first
        quantize(path, tmp_path / "tiny.int8.onnx", QuantizeConfig(batch_sizes=(1,)))
    assert seen[0] == 8


def _tiny_mlp(tmp_path):
    """A 4-8-2 MLP: its integer kernels cost more than they save at any batch size."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    return export(model, tmp_path / "tiny.onnx", ExportConfig(exporters=("torchscript",)),
                  inputs=["x:float32:batch,4"]).artifacts["onnx"]


@pytest.mark.slow  # a quantize search
def test_refuses_when_every_recipe_is_slower(tmp_path):
    onnx_path = _tiny_mlp(tmp_path)
    out = tmp_path / "tiny.int8.onnx"
    with pytest.raises(LatencyError) as err:
        quantize(onnx_path, out, QuantizeConfig(batch_sizes=(1,)))
    assert "no quantized candidate is both faster than FP32" in str(err.value)
    assert "best was" in str(err.value)
    assert not out.exists()
    measured = [c for c in err.value.report.to_dict()["candidates"] if c["speedup"]]
    assert measured and all(c["verdict"] != "ok" for c in measured)


def test_preprocess_falls_back_and_records_each_failure(zoo, tmp_path, monkeypatch):
    import onnxruntime.quantization.shape_inference as shape_inference

    def broken(*args, **kwargs):
        raise AssertionError("symbolic shape inference failed (_infer_Reshape)")

    monkeypatch.setattr(shape_inference, "quant_pre_process", broken)
    model_in, attempts = rewrites.preprocess(zoo["mlp"].onnx, tmp_path)
    assert model_in == zoo["mlp"].onnx
    assert [a["step"] for a in attempts] == ["full", "skip_symbolic_shape", "raw"]
    assert "_infer_Reshape" in attempts[0]["error"]


def test_candidate_build_falls_back_to_the_raw_model(zoo, tmp_path, monkeypatch):
    real_build = builders.build
    tried = []

    def flaky(recipe, model_path, out, calibration, samples):
        tried.append(model_path.name)
        if len(tried) == 1:
            raise RuntimeError("[ShapeInferenceError] Inferred shape and existing shape differ")
        return real_build(recipe, model_path, out, calibration, samples)

    monkeypatch.setattr(builders, "build", flaky)
    recipe = candidate_recipes({"LSTM"}, VNNI_X86)[0][0]
    model_in, _ = rewrites.preprocess(zoo["lstm"].onnx, tmp_path)
    stripped = rewrites.strip_value_info(model_in, tmp_path / "stripped.onnx")
    used = builders.build_with_fallback(recipe, [model_in, stripped], tmp_path / "q.onnx", None, 0)
    assert used == "stripped.onnx" and builders.count_integer_nodes(tmp_path / "q.onnx") > 0


def _outlier_mlp(tmp_path):
    """256-1024-1024-1024-10 MLP whose last hidden activation has one channel ~1000x the rest
    (the function is unchanged: the last layer's weights are scaled down to match). Per-tensor
    U8 quantization of that activation wipes out every other channel. The first two layers are
    untouched, so the model stays clearly faster in INT8 once the damaged part is back in FP32."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024),
                                torch.nn.ReLU(), torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
                                torch.nn.Linear(1024, 10))
    with torch.no_grad():
        model[4].weight[7] *= 1000.0
        model[4].bias[7] = 1000.0
        model[6].weight[:, 7] /= 1000.0
    return export(model, tmp_path / "outlier.onnx", ExportConfig(exporters=("torchscript",)),
                  inputs=["x:float32:batch,256"]).artifacts["onnx"]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["QDQ", "QOperator", "symmetric"])
def test_accuracy_fallback_excludes_the_damaging_node_and_meets_the_budget(tmp_path, monkeypatch, fmt):
    # Which static format is fastest varies from run to run; each must rank by the same tensors
    # (QOperator renames them all, so it is ranked on its QDQ twin; CI once ranked only /6/Gemm).
    # onnxruntime's layouts quantize /4/Gemm's output, which carries the outlier channel, and the
    # input /6/Gemm reads from it: both go back to FP32. OpenVINO's every-MatMul layout quantizes
    # inputs only, so /6/Gemm alone reads the damaged tensor and alone goes back.
    if fmt == "symmetric":
        pytest.importorskip("openvino")
        if not read_cpu().has_vnni:  # recipes.SYMMETRIC_WITHOUT_VNNI; test_static_matmul checks the skip
            pytest.skip("the symmetric OpenVINO layout is no candidate on a CPU without VNNI")
    first, damaged = ("/6/Gemm", {"/6/Gemm"}) if fmt == "symmetric" else ("/4/Gemm", {"/4/Gemm", "/6/Gemm"})
    real = stage_mod.candidate_recipes

    def only(*args, **kwargs):
        kept, skipped = real(*args, **kwargs)
        def wanted(r):
            return r.symmetric if fmt == "symmetric" else r.method == "static" and r.format == fmt and not r.symmetric

        return [r for r in kept if wanted(r)], skipped

    monkeypatch.setattr(stage_mod, "candidate_recipes", only)
    onnx_path = _outlier_mlp(tmp_path)
    out = tmp_path / "outlier.int8.onnx"
    # With two of four layers back in FP32 this model is only 1.2-1.3x on an AVX2-only CPU, where
    # one noisy trial once read it below 1.0 (the gate then rightly refused it): time it with
    # more rounds than the default so a trial's p50 is steadier.
    config = QuantizeConfig(mode="static", batch_sizes=(32,), max_accuracy_drop=0.02, rounds=30)
    try:
        record = quantize(onnx_path, out, config).record
        chosen = record["chosen"]
    except LatencyError as exc:
        # Under a busy full suite this 1.2-1.3x model has read 0.92x in all three trials: the
        # speed gate then rightly refuses it. What this test is about, which nodes go back to
        # FP32, is judged on the fallback's final candidate either way; a refusal must be for
        # speed alone, never for accuracy.
        record = exc.report.to_dict()
        final = [c for c in record["candidates"] if c["excluded_nodes"] and c["accuracy_drop"] <= 0.02
                 and not c["verdict"].startswith("superseded")]
        assert len(final) == 1 and "accuracy" not in final[0]["verdict"], record["candidates"]
        chosen = final[0]
    plain = [c for c in record["candidates"] if not c["excluded_nodes"]]
    assert plain and all(c["accuracy_drop"] > 0.02 for c in plain)  # the plain recipes miss it
    assert chosen["excluded_nodes"] and chosen["accuracy_drop"] <= 0.02
    first_step = record["accuracy_fallback"][0]
    assert first_step["ranking"][0]["node"] == first  # it quantizes the outlier channel
    # A folded Relu is compared after applying it: no layer reads as removing noise.
    assert min(r["added_nsr"] for r in first_step["ranking"]) > -0.05
    # Exactly the damaged pair returns to FP32: the harmless layers stay INT8 (on a CPU without
    # VNNI the 7-bit weights pull /2/Gemm into step 2, and the trim puts it back).
    assert set(chosen["excluded_nodes"]) == damaged
    if "chosen" not in record:
        assert not out.exists()  # refused: nothing written
        return
    # The verdict is on the unmodified artifact: no instrumentation outputs, agreement re-measured.
    engine = Engine(out)
    assert engine.output_names == Engine(onnx_path).output_names
    x = np.random.default_rng(1).standard_normal((512, 256)).astype(np.float32)
    agree = (engine.run(x)["output"].argmax(-1) == Engine(onnx_path).run(x)["output"].argmax(-1)).mean()
    assert agree >= 0.98


@pytest.mark.slow
def test_fallback_trim_puts_back_the_nodes_the_budget_does_not_need(tmp_path):
    onnx_path = _outlier_mlp(tmp_path)
    config = QuantizeConfig(mode="static", batch_sizes=(32,), max_accuracy_drop=0.02)
    eval_data = EvalData(make_feeds(Engine(onnx_path).inputs, batch=512, seed=1))
    search = search_mod.Search(onnx_path, config, eval_data, eval_data, tmp_path, lambda message: None)
    search.sources = [onnx_path]
    act, weight, reduce_range, _ = activation_weight_types(read_cpu())  # as auto picks them here
    recipe = Recipe("static", "QDQ", act, weight, reduce_range=reduce_range)
    too_many = ["/4/Gemm", "/6/Gemm", "/2/Gemm"]  # what a coarse step can leave in FP32
    start = search.build(recipe.excluding(too_many))
    assert start.accuracy_drop <= 0.02
    noise = {"/2/Gemm": 4e-4, "/4/Gemm": 1.0, "/6/Gemm": 0.03}
    chosen, trimmed = trim(search, recipe, too_many, noise, start)
    assert trimmed["back_in_int8"] == ["/2/Gemm"]  # least noisy first; the damaged pair is needed
    assert set(chosen.recipe.nodes_to_exclude) == {"/4/Gemm", "/6/Gemm"}
    assert chosen.accuracy_drop <= 0.02 and chosen.integer_nodes > start.integer_nodes
    assert [t["back_in_int8"] for t in trimmed["tried"]] == [True, False, False]
    assert str(start.verdict).startswith("superseded") and not start.verdict


@pytest.fixture(scope="module")
def transformer_data(zoo):
    data = zoo["transformer"].dataset
    return EvalData({"ids": data.x_test[:256]}, data.y_test[:256]), EvalData({"ids": data.x_train[:128]})


def _record(call):
    """The quantize record, chosen or refused. A refusal must be a speed or accuracy verdict
    that names a candidate of the table and carries the full report; a chosen model must be
    the one row marked chosen."""
    try:
        record = call().record
    except (LatencyError, AccuracyError) as exc:
        record = exc.report.to_dict()
        assert any(f"best was {c['recipe']}: " in str(exc) for c in record["candidates"]), str(exc)
        assert "chosen" not in record and not any(c["verdict"] == "chosen" for c in record["candidates"])
        return record
    assert [c for c in record["candidates"] if c["verdict"] == "chosen"] == [record["chosen"]]
    return record


@pytest.mark.slow
def test_auto_on_transformer_measures_every_family_and_judges_the_optimizer(zoo, transformer_data, tmp_path):
    eval_data, calibration = transformer_data
    record = _record(lambda: quantize(zoo["transformer"].onnx, tmp_path / "t.onnx",
                                      QuantizeConfig(batch_sizes=(8,), rounds=6, try_fusions=True),
                                      eval_data=eval_data, calibration=calibration))
    names = [c["recipe"] for c in record["candidates"]]
    for family in ("dynamic/", "static-QDQ/", "static-QOperator/", "int4-weight-only/"):
        assert any(n.startswith(family) for n in names), names
    opt = record["transformer_optimizer"]
    assert opt["tried"] and opt["kept"] == (opt["speedup_fp32"] >= 1.05)


def test_int4_weight_only_uses_matmulnbits(zoo, transformer_data, tmp_path):
    eval_data, _ = transformer_data
    record = _record(lambda: quantize(zoo["transformer"].onnx, tmp_path / "t4.onnx",
                                      QuantizeConfig(mode="int4", batch_sizes=(1,), rounds=4),
                                      eval_data=eval_data))
    (cand,) = record["candidates"]
    assert cand["integer_nodes"] > 0 and cand["error"] is None
    assert cand["accuracy_drop"] <= 0.02


def test_fp16_keeps_float32_io(zoo, tmp_path):
    from edgepipe.quantize.builders import build

    out = tmp_path / "fp16.onnx"
    build(candidate_recipes(set(), VNNI_X86, mode="fp16")[0][0], zoo["mlp"].onnx, out, None, 0)
    engine = Engine(out)
    assert engine.inputs[0].dtype == "float32"
    x = zoo["mlp"].dataset.x_test[:64]
    got, ref = engine.run(x)["logits"], Engine(zoo["mlp"].onnx).run(x)["logits"]
    assert got.dtype == np.float32 and (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.98
    np.testing.assert_allclose(got, ref, atol=0.05)  # FP16 has ~3 decimal digits


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_calibration_methods_build(zoo, tmp_path, method):
    from edgepipe.quantize.builders import build, count_integer_nodes

    recipe = [r for r in candidate_recipes({"Conv", "Gemm"}, VNNI_X86, calibration=method)[0]
              if r.format == "QDQ"][0]
    data = zoo["cnn"].dataset
    out = tmp_path / f"{method}.onnx"
    build(recipe, zoo["cnn"].onnx, out, EvalData({"x": data.x_train[:64]}), 64)
    assert count_integer_nodes(out) > 0
    agree = (Engine(out).run(data.x_test)["logits"].argmax(-1) ==
             Engine(zoo["cnn"].onnx).run(data.x_test)["logits"].argmax(-1)).mean()
    assert agree >= 0.95


@pytest.mark.slow
def test_user_model_with_attention_embeddings_layernorm_gelu(tmp_path):
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "examples" / "user_model.py"
    onnx_path = export(f"{example}:build", tmp_path / "text.onnx").artifacts["onnx"]
    record = _record(lambda: quantize(onnx_path, tmp_path / "text.int8.onnx",
                                      QuantizeConfig(batch_sizes=(8,), rounds=6)))
    built = [c for c in record["candidates"] if c["error"] is None]
    assert built, record["candidates"]
    # No labels: agreement with FP32 on generated ids/mask is the accuracy measure.
    assert all(c["agreement"] is not None for c in built)
    assert (tmp_path / "text.int8.onnx").exists() == ("chosen" in record)


def test_preprocess_leaves_nothing_in_the_working_directory(zoo, tmp_path, monkeypatch):
    """ORT's symbolic shape inference, when it gives up on the dynamo transformer, saves
    sym_shape_infer_temp.onnx and a uuid.data file into the cwd: they must stay in work_dir."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    work = tmp_path / "work"
    work.mkdir()
    _, attempts = rewrites.preprocess(zoo["transformer"].onnx, work)
    assert attempts[0]["step"] == "full" and not attempts[0]["ok"], attempts  # the path that writes
    assert list(cwd.iterdir()) == []


@pytest.mark.slow  # a quantize search and its confirmation trials
def test_a_lucky_first_timing_is_not_enough(tmp_path, monkeypatch):
    """One trial that flatters a slower candidate (as a slow FP32 session pair can) must not
    ship it: accepted candidates are re-timed with fresh sessions and judged on the median."""
    real_measure = search_mod.Search.measure

    def flattering(self, indices, rounds=None):
        real_measure(self, indices, rounds)
        for i in indices:  # the tiny MLP's INT8 is 0.7-1.0x; this trial reads it as 2-3x
            self.candidates[i].speedup = {b: 3 * s for b, s in self.candidates[i].speedup.items()}

    monkeypatch.setattr(search_mod.Search, "measure", flattering)
    import weakref

    confirming, live, alive_at_start = [], weakref.WeakSet(), []
    real_confirm = search_mod.Search.confirm

    def spied_confirm(self, *args, **kwargs):
        confirming.append(True)
        try:
            return real_confirm(self, *args, **kwargs)
        finally:
            confirming.pop()

    class Spy(Engine):  # how many of confirm's engines are alive as it makes the next one
        def __init__(self, *args, **kwargs):
            if confirming:
                alive_at_start.append(len(live))
            super().__init__(*args, **kwargs)
            if confirming:
                live.add(self)

    monkeypatch.setattr(search_mod.Search, "confirm", spied_confirm)
    monkeypatch.setattr(search_mod, "Engine", Spy)
    with pytest.raises(LatencyError) as err:
        quantize(_tiny_mlp(tmp_path), tmp_path / "q.onnx", QuantizeConfig(batch_sizes=(1,)))
    # a trial's FP32 and candidate sessions are released before the next trial makes its own
    # (BERT-base: they sat beside the new ones, 2.6 GB peak instead of 1.7)
    assert len(alive_at_start) >= 4 and max(alive_at_start) <= 1
    rows = err.value.report.to_dict()["candidates"]
    confirmed = [r for r in rows if r["speedup_trials"]]
    assert confirmed and all(r["verdict"].startswith("not confirmed") for r in confirmed)
    for r in confirmed:  # judged on the median of the flattering trial and two fresh ones
        trials = r["speedup_trials"]["1"]
        assert len(trials) == 3 and r["speedup"]["1"] == pytest.approx(float(np.median(trials)), abs=2e-3)
        assert trials[0] > max(trials[1:])  # the first one, outvoted
    assert not (tmp_path / "q.onnx").exists()


def _scales(path) -> dict[str, float]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(path)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {n.input[0]: float(inits[n.input[1]]) for n in model.graph.node
            if n.op_type == "QuantizeLinear" and n.input[1] in inits and inits[n.input[1]].size == 1}


def test_calibration_streams_one_batch_at_a_time_and_is_shared_by_the_static_recipes(zoo, tmp_path, monkeypatch):
    """Strided MinMax calibration gives the ranges of whole-set calibration (min of mins) while
    holding one batch of intermediate tensors; the static recipes of one search calibrate once."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    from edgepipe.quantize.calibration import ArrayCalibrationReader

    data = EvalData({"x": zoo["mlp"].dataset.x_train[:200]})
    reader = ArrayCalibrationReader(data.inputs, 200)
    assert len(reader) == 7  # 6 full batches of 32 and one of 8
    reader.set_range(5, 7)
    assert [len(b["x"]) for b in iter(reader.get_next, None)] == [32, 8]

    calls = []
    real_get_next = ArrayCalibrationReader.get_next
    monkeypatch.setattr(ArrayCalibrationReader, "get_next", lambda self: calls.append(1) or real_get_next(self))
    qdq = Recipe("static", "QDQ", "U8", "S8", per_channel=True)
    builders.build(qdq, zoo["mlp"].onnx, tmp_path / "a.onnx", data, 200)
    first_calls = len(calls)
    builders.build(replace(qdq, per_channel=False), zoo["mlp"].onnx, tmp_path / "b.onnx", data, 200)
    assert first_calls > 7 and len(calls) == first_calls  # the second recipe read the cache, not the data
    assert len(list(tmp_path.glob("calibration-*.json"))) == 1

    whole = tmp_path / "whole.onnx"  # onnxruntime's own, unstrided, all 200 rows at once
    quantize_static(str(zoo["mlp"].onnx), str(whole), ArrayCalibrationReader(data.inputs, 200),
                    quant_format=QuantFormat.QDQ, **builders._common_options(qdq, __import__("onnx").load(
                        zoo["mlp"].onnx).graph))
    mine, theirs = _scales(tmp_path / "a.onnx"), _scales(whole)
    assert mine and set(mine) <= set(theirs)  # (edgepipe leaves the logits unquantized)
    assert all(mine[k] == pytest.approx(theirs[k], rel=1e-6) for k in mine)


def test_static_qdq_folds_relu_so_ort_chains_integer_gemms(zoo, tmp_path):
    """Relu left out of the quantizer's op types keeps its own Q/DQ pair, and ORT then runs a
    DequantizeLinear + QuantizeLinear requantization between every two layers. And the logits
    are not rounded to 8 bits on their way out."""
    import onnx
    import onnxruntime as ort

    data = zoo["mlp"].dataset
    out = tmp_path / "mlp.qdq.onnx"
    builders.build(Recipe("static", format="QDQ", activation_type="U8", weight_type="S8"), zoo["mlp"].onnx, out,
                   EvalData({"x": data.x_train[:128]}), 128)
    assert "Relu" not in {n.op_type for n in onnx.load(out).graph.node}
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 4
    ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node]
    assert ops.count("QGemm") == 3 and "DequantizeLinear" not in ops, ops  # the last QGemm writes float
    x = data.x_test[:256]
    agree = (Engine(out).run(x)["logits"].argmax(1) == Engine(zoo["mlp"].onnx).run(x)["logits"].argmax(1)).mean()
    assert agree >= 0.98


def test_the_ceiling_of_a_kernel_that_reads_the_graph_input(tmp_path, monkeypatch):
    """ResNet-50's heaviest kernel is its stem conv, which takes pixel_values directly and is not
    representative (0.86x in INT8 where the model ran 2.07x): another kernel is preferred, and
    when the stem is all there is, the cut model is calibrated at the shapes it declares."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgepipe.quantize.ceiling import measure_ceiling
    from edgepipe.runtime.sessions import SessionSetting

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((16, 3, 3, 3)).astype(np.float32), "W")
    small = numpy_helper.from_array(rng.standard_normal((4, 16, 1, 1)).astype(np.float32), "W2")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["pixel_values", "W"], ["h"], pads=[1, 1, 1, 1], name="stem"),
         helper.make_node("Conv", ["h", "W2"], ["y"], name="head")], "g",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 32, 32])], [weight, small])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "conv.onnx")
    recipe = Recipe("static", "QDQ", "U8", "S8", per_channel=True)
    specs = Engine(tmp_path / "conv.onnx").inputs
    result = measure_ceiling(tmp_path / "conv.onnx", specs, recipe, 8, SessionSetting(1, False), tmp_path, rounds=3)
    assert "error" not in result, result
    # the stem has 432/(432+64) of the multiply-adds, but a kernel on the raw input is passed over
    assert result["node"] == "head" and result["input_shape"] == [8, 16, 32, 32] and result["weight_shape"] == [4, 16, 1, 1]
    assert result["share_of_macs"] == pytest.approx(64 / (432 + 64), abs=1e-3) and result["kernel_speedup"] > 0
    model.graph.node.pop()  # the stem alone: then it is the kernel, read from the graph input
    model.graph.output.pop()
    model.graph.output.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", 16, 32, 32]))
    onnx.save(model, tmp_path / "stem.onnx")
    result = measure_ceiling(tmp_path / "stem.onnx", specs, recipe, 8, SessionSetting(1, False), tmp_path, rounds=3)
    assert result["node"] == "stem" and result["input_shape"] == [8, 3, 32, 32] and result["share_of_macs"] == 1.0
    # calibration batches smaller than the timed batch (its 4 MB cap: 5 of ResNet-50's 8 rows)
    from edgepipe.quantize import calibration

    monkeypatch.setattr(calibration, "rows_per_batch", lambda data, cap, max_bytes=0: 3)
    result = measure_ceiling(tmp_path / "conv.onnx", specs, recipe, 8, SessionSetting(1, False), tmp_path, rounds=3)
    assert "error" not in result, result


@pytest.mark.skipif((__import__("os").cpu_count() or 1) < 2, reason="one core: there is no thread sweep")
def test_one_thread_is_timed_only_at_batch_sizes_whose_calls_are_short(tmp_path, monkeypatch):
    """The 1-thread setting wins only on overhead-bound calls; at a batch size past
    SWEEP_MAX_CALL_S per call it doubled the timing (ResNet-50 at batch 8, BERT-base) and never
    won, so there all cores alone are timed, and the records say which settings ran where."""
    import os

    from edgepipe.quantize import budget
    from edgepipe.quantize.rewrites import Sources
    from edgepipe.runtime.sessions import SessionSetting

    onnx_path = _tiny_mlp(tmp_path)
    data = EvalData(make_feeds(Engine(onnx_path).inputs, batch=64, seed=0))
    cores = os.cpu_count()

    def search(call_cost=None):
        return search_mod.Search(onnx_path, QuantizeConfig(batch_sizes=(1, 8)), data, data, tmp_path,
                                 lambda m: None, call_cost=call_cost)

    assert {b: [s.threads for s in ss] for b, ss in search().sweep.items()} == {1: [1, cores], 8: [1, cores]}
    mixed = search(call_cost={1: 0.001, 8: 0.3})  # ResNet-50-like: cheap at 1, costly at 8
    assert {b: [s.threads for s in ss] for b, ss in mixed.sweep.items()} == {1: [1, cores], 8: [cores]}
    assert [s.threads for s in mixed.settings] == [1, cores]
    recipe = Recipe("dynamic", weight_type="S8")
    mixed.sources = Sources(onnx_path, onnx_path, tmp_path)
    mixed.build(recipe)
    timed = []
    original = search_mod.measure_interleaved

    def spy(fns, batch, **kwargs):
        timed.append((batch, sorted({(str(key), s.threads) for key, s in fns})))
        return original(fns, batch, **kwargs)

    monkeypatch.setattr(search_mod, "measure_interleaved", spy)
    mixed.measure([0])
    assert timed == [(1, [("0", 1), ("0", cores), ("fp32", 1), ("fp32", cores)]), (8, [("0", cores), ("fp32", cores)])]
    cand = mixed.candidates[0]
    assert set(cand.p50_by_setting[SessionSetting(1, False)]) == {1}  # never timed at 8
    assert cand.settings[8] == SessionSetting(cores, False) and set(mixed.fp32_p50) == {1, 8}
    monkeypatch.setattr(budget, "SWEEP_MAX_CALL_S", 0.0)
    assert [(s.threads, s.spinning) for s in search().settings] == [(cores, False)]


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
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], [scale, zero, weight])
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
    graph = helper.make_graph(nodes, "vit", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])],
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


def test_a_large_model_is_preprocessed_lean_and_every_candidate_builds_from_that(tmp_path, monkeypatch):
    """Past LEAN_PREPROCESS_BYTES the model is stripped of value_info and optimized by one
    onnxruntime session instead of quant_pre_process (BERT-base: 3.5 s and 1.25 GB instead of
    10 s and 2.4 GB), and every dynamic build starts from it."""
    monkeypatch.setattr(rewrites, "LEAN_PREPROCESS_BYTES", 0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10))
    onnx_path = export(model, tmp_path / "mlp.onnx", ExportConfig(exporters=("dynamo",)),
                       inputs=["x:float32:batch,256"]).artifacts["onnx"]
    eval_data = EvalData(make_feeds(Engine(onnx_path).inputs, batch=64, seed=1))
    search = search_mod.Search(onnx_path, QuantizeConfig(mode="dynamic", batch_sizes=(8,)), eval_data, eval_data,
                               tmp_path, lambda message: None)
    stage_mod.prepare(search, {"Gemm", "Relu"})
    assert search.sources.first.name == "pre_lean.onnx"
    built = [search.build(Recipe("dynamic", weight_type="S8", per_channel=pc)) for pc in (False, True)]
    assert all(c.error is None and c.built_from == "pre_lean.onnx" and c.integer_nodes == 2 for c in built), built
    # the Gemms are quantized where they stand (dynamic_matmul): no whole-model Gemm-as-MatMul copy
    assert not list(tmp_path.glob("gemm_as_matmul-*.onnx"))
    assert all(c.agreement >= 0.9 for c in built)


def test_one_confirmation_trial_is_enough_only_for_a_wide_agreeing_lead():
    search = object.__new__(search_mod.Search)
    search.config = QuantizeConfig()  # needs 1.05x
    assert search.clear_lead({1: [1.74, 1.80], 8: [1.70, 1.73]})
    assert not search.clear_lead({1: [1.74, 1.20]})  # readings disagree: a second trial
    assert not search.clear_lead({1: [1.24, 1.25]})  # under 1.2 x 1.05: a second trial


def test_past_the_budget_a_wide_lead_is_confirmed_over_two_rounds_a_narrow_one_over_three(monkeypatch):
    import time
    from types import SimpleNamespace

    from edgepipe.quantize.search import Candidate
    from edgepipe.runtime.sessions import SessionSetting

    setting = SessionSetting(2, False)
    search = object.__new__(search_mod.Search)
    search.config = QuantizeConfig(batch_sizes=(8,), time_budget_s=1.0)
    search.started = time.perf_counter() - 10.0  # the budget is spent: rounds shrink to the floor
    search.rounds_used, search.sweep, search._call_cost = {}, {8: [setting]}, {8: 0.01}
    search.fp32_settings, search.fp32_p50, search.onnx_path = {8: setting}, {8: 10.0}, "fp32.onnx"
    search.eval_data, search.resolved = EvalData({"x": np.zeros((8, 4), np.float32)}), True
    search.engine = lambda *args, **kwargs: SimpleNamespace(runner=lambda feeds: (lambda: None))
    trials = []

    def confirm(speedup: float) -> tuple[bool, int, list[int]]:
        def timing(fns, batch, rounds, spinning):
            trials.append(rounds)
            return {"fp32": SimpleNamespace(p50_ms=10.0), "cand": SimpleNamespace(p50_ms=10.0 / speedup)}

        monkeypatch.setattr(search_mod, "measure_interleaved", timing)
        trials.clear()
        cand = Candidate(Recipe("dynamic"), speedup={8: speedup}, settings={8: setting}, accuracy_drop=0.0)
        return search.confirm(cand), search.rounds_used["confirm"], list(trials)

    # 1.8x against the 1.05x needed: one fresh trial of 2 rounds agrees, and that confirms it
    assert confirm(1.8) == (True, 2, [2])
    # 1.15x is under 1.2 x 1.05: 3 rounds, and a second fresh trial as before
    assert confirm(1.15) == (True, 3, [3, 3])


def test_kernel_twins_are_timed_once_and_judged_on_their_own_accuracy(tmp_path):
    """reduce_range changes weight values only: same nodes, types and ranks, so one timing
    serves both; per-channel scales are vectors where per-tensor ones are scalars: timed apart."""
    from edgepipe.quantize.candidate import Candidate
    from edgepipe.quantize.twins import group, inherit, kernel_signature

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10))
    onnx_path = export(model, tmp_path / "mlp.onnx", ExportConfig(exporters=("dynamo",)),
                       inputs=["x:float32:batch,256"]).artifacts["onnx"]
    recipes = [Recipe("dynamic", weight_type="S8"), Recipe("dynamic", weight_type="S8", per_channel=True),
               Recipe("dynamic", weight_type="S8", reduce_range=True)]
    cands = []
    for i, recipe in enumerate(recipes):
        builders.build(recipe, onnx_path, tmp_path / f"c{i}.onnx", None, 0)
        cands.append(Candidate(recipe, path=tmp_path / f"c{i}.onnx"))
    assert kernel_signature(cands[0].path, "onnxruntime") == kernel_signature(cands[2].path, "onnxruntime")
    assert kernel_signature(cands[0].path, "onnxruntime") != kernel_signature(cands[1].path, "onnxruntime")
    assert kernel_signature(cands[0].path, "onnxruntime") != kernel_signature(cands[0].path, "openvino")
    timed, twins = group(cands, [0, 1, 2])
    assert timed == [0, 1] and twins == {0: [2], 1: []} and cands[2].timed_as is cands[0]
    cands[0].speedup, cands[0].p50_ms = {8: 1.5}, {8: 0.2}
    inherit(cands[2], cands[0])
    assert cands[2].speedup == {8: 1.5} and cands[2].row().timed_as == recipes[0].name


def test_calibration_calls_hold_a_bounded_amount_of_intermediate_tensors(tmp_path, monkeypatch):
    """The calibration model outputs every intermediate tensor: rows per call come from their
    inferred size (ResNet-50: 106 MB per image, so 2 per call, not the 5 its 4 MB input cap
    allowed), and from the model's size when the shapes cannot be inferred."""
    from edgepipe.quantize import calibration

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10))
    onnx_path = export(model, tmp_path / "mlp.onnx", ExportConfig(exporters=("dynamo",)),
                       inputs=["x:float32:batch,256"]).artifacts["onnx"]
    data = {"x": np.zeros((64, 256), np.float32)}
    # Gemm 512 + Relu 512 + Gemm 10 floats per row: 4136 bytes
    assert calibration.calibration_rows(onnx_path, data) == 32
    monkeypatch.setattr(calibration, "ACTIVATION_BYTES", 3 * 4136)
    assert calibration.calibration_rows(onnx_path, data) == 3
    import edgepipe.onnxgraph as onnxgraph

    monkeypatch.setattr(onnxgraph, "activation_bytes", lambda *a: None)
    assert calibration.calibration_rows(onnx_path, data) == 3  # onnxruntime's symbolic inference sizes them
    monkeypatch.setattr(onnxgraph, "symbolic_activation_bytes", lambda *a: None)
    assert calibration.calibration_rows(onnx_path, data) == 32  # unknown shapes, small model: the input cap
    monkeypatch.setattr(calibration, "LARGE_MODEL_BYTES", 0)
    assert calibration.calibration_rows(onnx_path, data) == calibration.UNKNOWN_LARGE_ROWS


def test_a_build_that_would_end_past_the_build_share_of_the_budget_is_not_started():
    """A first static build costs its calibration: the calibration rows at CALIBRATION_FACTOR
    FP32 calls each, on top of the last build (ViT-base: 32 images at 222 ms, about 27 s, which
    would have ended past 40% of 120 s; built anyway, it added 12 s and 0.45 GB and lost)."""
    import time

    from edgepipe.quantize.budget import CALIBRATION_FACTOR
    from edgepipe.quantize.calibration import MeasuredRanges

    search = object.__new__(search_mod.Search)
    search.config = QuantizeConfig(time_budget_s=120)
    search.calibration = EvalData({"x": np.zeros((32, 4), np.float32)})
    search._call_cost = {1: 0.2, 8: 1.2}
    seconds = {"dynamic": [6.0, 5.0]}
    static, dynamic = Recipe("static", "QDQ", per_channel=True), Recipe("dynamic", weight_type="S8")
    assert search.build_estimate(dynamic, seconds) == 5.0  # its method's last build
    assert search.build_estimate(static, seconds) == pytest.approx(5.0 + CALIBRATION_FACTOR["static"] * 32 * 0.2)
    assert search.build_estimate(static, {"static": [20.0], **seconds}) == 20.0
    symmetric = Recipe("static", "QDQ", "S8", per_channel=True, symmetric=True)
    assert search.build_estimate(symmetric, seconds) == pytest.approx(5.0 + CALIBRATION_FACTOR["symmetric"] * 32 * 0.2)
    # ranges measured in the reference pass: no calibration left to pay for
    search.calibration = replace(search.calibration, ranges=MeasuredRanges(["x"], rows=32))
    assert search.build_estimate(symmetric, seconds) == 5.0
    assert search.build_estimate(static, seconds) == pytest.approx(5.0 + CALIBRATION_FACTOR["static"] * 32 * 0.2)
    search.started = time.perf_counter() - 30  # 30 s spent: 48 s is 40% of the budget
    assert search.build_fits(dynamic, seconds, 0.4) and not search.build_fits(static, seconds, 0.4)
    search.config = QuantizeConfig(time_budget_s=200)
    assert search.build_fits(static, seconds, 0.4)
    search.config = QuantizeConfig(time_budget_s=None)
    assert search.build_fits(static, seconds, 0.4)


def test_a_file_twin_for_another_backend_is_estimated_as_its_evaluation_not_a_build():
    """OpenVINO's run of the per-channel QDQ file copies that file: estimated as a static build
    (6 s on ResNet-50), it was skipped under a 40 s budget and ResNet-50 shipped the 7% slower
    onnxruntime run of the same file."""
    from edgepipe.quantize.budget import BIAS_CORRECTION_FACTOR

    search = object.__new__(search_mod.Search)
    search.config = QuantizeConfig(time_budget_s=40)
    search.calibration = EvalData({"x": np.zeros((32, 4), np.float32)})
    search._call_cost, search.rows = {1: 0.05, 8: 0.38}, 32
    qdq = Recipe("static", "QDQ", per_channel=True)
    on_openvino = replace(qdq, backend="openvino")
    search.candidates = []
    assert search.build_kind(on_openvino) == "static"  # nothing to copy yet: a build
    search.candidates = [search_mod.Candidate(qdq, path=None)]
    assert search.build_kind(on_openvino) == "twin" and search.build_kind(qdq) == "static"
    seconds = {"static": [6.0]}
    assert search.build_estimate(on_openvino, seconds) == pytest.approx(32 * 0.05)  # one FP32 call per row
    assert search.build_estimate(on_openvino, {"twin": [2.5], **seconds}) == 2.5
    # a bias-corrected twin: its base's file, one FP32 pass over the calibration rows and its evaluation
    corrected = replace(qdq, bias_correction=True)
    assert search.build_kind(corrected) == "bias-correction"
    assert search.build_estimate(corrected, seconds) == pytest.approx((32 + BIAS_CORRECTION_FACTOR * 32) * 0.05)
    assert search.build_kind(replace(corrected, per_channel=False)) == "static"  # its base is not built
    import time

    search.started = time.perf_counter() - 19  # ResNet-50's first build ended at 19 s of 40
    assert not search.build_fits(qdq, seconds, stage_mod.BUILD_SHARE)
    assert search.build_fits(on_openvino, seconds, stage_mod.TWIN_SHARE)
    # ResNet-50 under the 25 s default on a VNNI EPYC: its file built some 13 s in, OpenVINO's run
    # (64 rows at 40 ms each to evaluate) would end past 60%; it was 3.55x to onnxruntime's 3.07x
    search.config, search._call_cost, search.rows = QuantizeConfig(time_budget_s=25), {1: 0.04, 8: 0.32}, 64
    search.started = time.perf_counter() - 13.5
    assert search.build_fits(on_openvino, seconds, stage_mod.TWIN_SHARE)
    search.candidates[0].error = "failed"
    assert search.build_kind(on_openvino) == "static"  # a failed file is not copied


def test_device_cuda_is_checked_before_any_work(tmp_path, cli, monkeypatch):
    import onnxruntime as ort

    from edgepipe.errors import ConfigError

    with pytest.raises(ConfigError, match="device 'gpu' unknown; choose cpu, cuda"):
        QuantizeConfig(device="gpu")
    with pytest.raises(ConfigError, match="on device cuda choose auto or fp16"):
        QuantizeConfig(device="cuda", mode="dynamic")
    with pytest.raises(ConfigError, match="backend.s. openvino run on the CPU"):
        QuantizeConfig(device="cuda", backends=("openvino",))
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(ConfigError, match="needs onnxruntime-gpu"):
        QuantizeConfig(device="cuda")
    out = tmp_path / "tiny.fp16.onnx"
    result = cli("quantize", _tiny_mlp(tmp_path), "-o", out, "--device", "cuda")
    assert result.exit_code == 2 and "needs onnxruntime-gpu" in result.output, result.output
    assert "Traceback" not in result.output and not out.exists()


@pytest.mark.slow  # a quantize search (FP16 on the CPU provider)
def test_on_device_cuda_fp16_is_timed_at_one_setting_and_the_record_says_where(tmp_path, monkeypatch):
    """The GPU search's plumbing, run on the CPU provider (tests/test_gpu.py runs it on a GPU):
    FP16 is the only candidate, FP32 and it are timed at one session setting (threads and
    spinning are CPU settings), no CPU kernel ceiling is measured, the accuracy fallback (which
    ranks nodes on the CPU) is not run, and the record names the provider the search ran on."""
    import os

    import onnxruntime as ort

    from edgepipe.errors import GateFailed

    available = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers", lambda: [*available, "CUDAExecutionProvider"])
    monkeypatch.setattr(QuantizeConfig, "providers", property(lambda self: "cpu"))
    config = QuantizeConfig(device="cuda", batch_sizes=(1, 8), time_budget_s=0)
    try:
        report = quantize(_tiny_mlp(tmp_path), tmp_path / "tiny.fp16.onnx", config).report
    except GateFailed as refused:  # FP16 on the CPU is rarely faster: the record is what is checked
        report = refused.report
    assert [c.recipe for c in report.candidates] == ["fp16/io-fp32"]
    assert report.device["provider"][0] == "CPUExecutionProvider"
    assert report.ceiling is None
    cores = os.cpu_count()
    assert [row["threads"] for row in report.fp32.p50_ms_by_session] == [cores]
    assert all(s["threads"] == cores and not s["spinning"] for s in report.fp32.sessions.values())
    assert not report.accuracy_fallback or report.accuracy_fallback[0]["step"] == "skipped"
