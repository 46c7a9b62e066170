"""Quantization on the zoo: INT8 within its accuracy budget and faster where the CPU allows, every
recipe family measured on the transformer, calibration methods and user models with attention."""

from __future__ import annotations

import numpy as np
import pytest
from quantize_common import VNNI_X86, eval_sets

from edgepipe.errors import AccuracyError, LatencyError
from edgepipe.exporters import export
from edgepipe.quantize import (
    EvalData,
    QuantizeConfig,
    builders,
    candidate_recipes,
    quantize,
)
from edgepipe.quantize.recipes import Recipe
from edgepipe.runtime import Engine, measure_interleaved

# Deployment batch sizes per zoo model: an 8x8 CNN at batch 1 is overhead-bound (INT8 ~0.9x).
DEPLOY_BATCHES = {"mlp": (1, 32), "cnn": (32,), "lstm": (1, 32), "transformer": (1, 32)}


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

    example = Path(__file__).resolve().parents[2] / "examples" / "user_model.py"
    onnx_path = export(f"{example}:build", tmp_path / "text.onnx").artifacts["onnx"]
    record = _record(lambda: quantize(onnx_path, tmp_path / "text.int8.onnx",
                                      QuantizeConfig(batch_sizes=(8,), rounds=6)))
    built = [c for c in record["candidates"] if c["error"] is None]
    assert built, record["candidates"]
    # No labels: agreement with FP32 on generated ids/mask is the accuracy measure.
    assert all(c["agreement"] is not None for c in built)
    assert (tmp_path / "text.int8.onnx").exists() == ("chosen" in record)


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
