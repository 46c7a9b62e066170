"""compare: end-to-end verdicts and localization of the first diverging node."""

from __future__ import annotations

import onnx
import pytest
from onnx import numpy_helper

from edgepipe.compare import compare


def corrupt_copy(src, dst, node_index: int = 1, factor: float = 1.5) -> str:
    """Copy an ONNX model, scaling the weight of its `node_index`-th Conv/Gemm; returns that node."""
    model = onnx.load(str(src))
    nodes = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    node = nodes[node_index]
    init = next(i for i in model.graph.initializer if i.name == node.input[1])
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * factor, init.name))
    onnx.save(model, str(dst))
    return node.name


def test_identical_pair_passes(zoo, cli):
    report = compare(str(zoo["cnn"].onnx), str(zoo["cnn"].onnx))
    assert report and report.outputs[0].max_abs_diff == 0.0 and report.outputs[0].top1_agreement == 1.0
    result = cli("compare", zoo["cnn"].onnx, zoo["cnn"].onnx)
    assert result.exit_code == 0 and "parity ok" in result.output


def test_corrupted_weight_is_localized_to_its_node(zoo, tmp_path, cli):
    bad = tmp_path / "bad.onnx"
    culprit = corrupt_copy(zoo["cnn"].onnx, bad, node_index=1)
    report = compare(str(zoo["cnn"].onnx), str(bad))
    assert not report
    assert report.first_divergence.node == culprit
    assert report.offenders[0].node == culprit
    assert "instrumented" in report.localized
    result = cli("compare", zoo["cnn"].onnx, bad, "--json", tmp_path / "r.json")
    assert result.exit_code == 1
    assert f"first divergence: node '{culprit}'" in result.output and "VIOLATED" in result.output


def test_checkpoint_against_its_export_uses_held_out_data(zoo):
    report = compare(str(zoo["lstm"].checkpoint), str(zoo["lstm"].onnx))
    assert report and report.inputs == "the checkpoint's held-out split"
    out = report.outputs[0]
    assert out.cosine > 0.999999 and out.sqnr_db > 60


def test_fp32_against_its_qdq_version(zoo, tmp_path):
    from edgepipe.quantize import EvalData
    from edgepipe.quantize.builders import build
    from edgepipe.quantize.recipes import candidate_recipes
    from edgepipe.runtime import CpuInfo

    cpu = CpuInfo("x", "x86_64", ["avx512_vnni"], 2)
    recipe = [r for r in candidate_recipes({"Conv", "Gemm"}, cpu)[0] if r.format == "QDQ"][0]
    qdq = tmp_path / "qdq.onnx"
    data = zoo["cnn"].dataset
    build(recipe, zoo["cnn"].onnx, qdq, EvalData({"x": data.x_train[:64]}), 64)
    report = compare(str(zoo["cnn"].onnx), str(qdq), data={"x": data.x_test[:64]}, atol=1e-4)
    assert not report  # INT8 is not bit-exact
    assert report.outputs[0].top1_agreement >= 0.95
    assert report.first_divergence is not None  # matched through the Q/DQ aliases
    assert report.first_divergence.op in ("Conv", "Relu", "MaxPool", "GlobalAveragePool", "ReduceMean")
    # Judged by agreement, what INT8 owes FP32, the same pair passes; each threshold decides.
    out = report.outputs[0]
    agreeing = compare(str(zoo["cnn"].onnx), str(qdq), data={"x": data.x_test[:64]}, min_top1=0.95, min_cosine=0.99,
                       do_localize=False)
    assert bool(agreeing) == (out.cosine >= 0.99) and agreeing.criteria == "top-1 agreement >= 0.95 and cosine >= 0.99"
    strict = compare(str(zoo["cnn"].onnx), str(qdq), data={"x": data.x_test[:64]}, min_top1=1.0, do_localize=False)
    assert bool(strict) == (out.top1_agreement == 1.0)
    from edgepipe.errors import InputError

    with pytest.raises(InputError, match="min cosine must be between 0 and 1"):
        compare(str(zoo["cnn"].onnx), str(qdq), data={"x": data.x_test[:64]}, min_cosine=1.5)


def test_incomparable_models(zoo):
    from edgepipe.errors import InputError

    with pytest.raises(InputError, match="not comparable"):
        compare(str(zoo["cnn"].onnx), str(zoo["lstm"].onnx))


def test_per_output_tolerance(zoo, tmp_path, cli):
    bad = tmp_path / "bad.onnx"
    corrupt_copy(zoo["mlp"].onnx, bad, node_index=2, factor=1.05)  # 5% off in the last layer
    assert cli("compare", zoo["mlp"].onnx, bad, "--no-localize").exit_code == 1
    # An override far above any possible difference must be what decides the verdict.
    result = cli("compare", zoo["mlp"].onnx, bad, "--tol", "logits=1e6:0")
    assert result.exit_code == 0, result.output
    unknown = cli("compare", zoo["mlp"].onnx, bad, "--tol", "probs=1")
    assert unknown.exit_code == 2 and "unknown output(s) probs" in unknown.output
