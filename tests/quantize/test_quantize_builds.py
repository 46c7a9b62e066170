"""Building candidates: pre-processing and its fallbacks, the lean path for large models,
calibration a batch at a time within bounded memory, and the accuracy-aware fallback."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from quantize_common import VNNI_X86

from edgepipe.errors import LatencyError
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
from edgepipe.runtime import Engine
from edgepipe.runtime.hardware import read_cpu
from edgepipe.runtime.spec import make_feeds


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
    # more rounds than the default so a trial's p50 is steadier. No time budget: what is judged
    # here is which nodes the fallback takes back, and 30 rounds of a slow 2-core machine can
    # spend the default budget before the fallback's last step (it then stops, as it should).
    config = QuantizeConfig(mode="static", batch_sizes=(32,), max_accuracy_drop=0.02, rounds=30, time_budget_s=0)
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
