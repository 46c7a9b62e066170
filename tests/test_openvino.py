"""OpenVINO as a backend: the Engine runs the same ONNX file on OpenVINO's CPU plugin, quantize
measures it as one more candidate, and a run that chose it is deployed on it."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from quantize_common import AVX2_ONLY

from edgepipe.errors import ConfigError, InputError
from edgepipe.quantize import QuantizeConfig, candidate_recipes, quantize
from edgepipe.quantize.verdict import CHOSEN, OK, Verdict
from edgepipe.runtime import Engine
from edgepipe.runtime import openvino_backend as ovb
from edgepipe.runtime.modelfile import onnx_metadata
from edgepipe.runtime.spec import METADATA_KEY

needs_openvino = pytest.mark.skipif(not ovb.available(), reason="openvino not installed (pip install "
        "'edgepipe[openvino]')")


def _cnn(path, channels: int = 32, size: int = 16):
    """Conv-Relu-Conv-Relu-GlobalAveragePool-Flatten on 3 x size x size, with edgepipe's input
    spec in its metadata as the exporter writes it."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array((rng.standard_normal((channels, 3, 3, 3)) * 0.3).astype(np.float32), "W1")
    w2 = numpy_helper.from_array((rng.standard_normal((channels, channels, 3, 3)) * 0.1).astype(np.float32), "W2")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W1"], ["a"], pads=[1, 1, 1, 1], name="conv1"),
         helper.make_node("Relu", ["a"], ["b"], name="relu1"),
         helper.make_node("Conv", ["b", "W2"], ["c"], pads=[1, 1, 1, 1], name="conv2"),
         helper.make_node("Relu", ["c"], ["d"], name="relu2"),
         helper.make_node("GlobalAveragePool", ["d"], ["e"], name="pool"),
         helper.make_node("Flatten", ["e"], ["logits"], name="flatten")], "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", channels])], [w1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    spec = [{"name": "x", "dtype": "float32", "shape": ["batch", 3, size, size], "low": None, "high": None,
             "example": {}}]
    helper.set_model_props(model, {METADATA_KEY: json.dumps(spec), "note": "ü and a long value " * 20})
    onnx.save(model, path)
    return path


def test_metadata_is_read_from_the_file_without_onnx(tmp_path):
    path = _cnn(tmp_path / "cnn.onnx")
    expected = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert onnx_metadata(path) == expected and METADATA_KEY in expected
    (tmp_path / "junk.onnx").write_bytes(b"\x07\x07\x07")
    with pytest.raises(InputError, match="not an ONNX model"):
        onnx_metadata(tmp_path / "junk.onnx")


def test_a_missing_or_unknown_backend_is_one_clear_error(tmp_path, monkeypatch):
    path = _cnn(tmp_path / "cnn.onnx")
    with pytest.raises(InputError, match="unknown backend 'tvm'"):
        Engine(path, backend="tvm")
    monkeypatch.setattr(ovb, "available", lambda: False)
    with pytest.raises(InputError, match=r"pip install 'edgepipe\[openvino\]'"):
        Engine(path, backend="openvino")
    with pytest.raises(ConfigError, match="needs the openvino package"):
        QuantizeConfig(backends=("openvino",))
    assert QuantizeConfig().active_backends == ("onnxruntime",)


def test_openvino_recipes_are_static_qdq_full_range_and_respect_vetoes():
    recipes, _ = candidate_recipes({"Conv", "Relu"}, AVX2_ONLY, backends=("onnxruntime", "openvino"))
    ov = [r for r in recipes if r.backend == "openvino" and not r.bias_correction]
    assert len(ov) == 1 and ov[0].format == "QDQ" and ov[0].per_channel and not ov[0].reduce_range
    assert ov[0].name.endswith("/openvino") and ov[0].file_twin.backend == "onnxruntime"
    assert ov[0].file_twin in [r for r in recipes if r.backend == "onnxruntime"]  # the file it reuses
    only_ov, _ = candidate_recipes({"Conv"}, AVX2_ONLY, backends=("openvino",))
    assert [(r.backend, r.bias_correction) for r in only_ov] == [("openvino", False), ("openvino", True)]
    lstm, _ = candidate_recipes({"LSTM", "MatMul"}, AVX2_ONLY, backends=("onnxruntime", "openvino"))
    assert all(r.backend == "onnxruntime" for r in lstm)  # static QDQ leaves LSTM in float


@needs_openvino
def test_engine_on_openvino_matches_onnxruntime_and_validates_inputs(tmp_path):
    path = _cnn(tmp_path / "cnn.onnx")
    ov, ort = Engine(path, backend="openvino", threads=1), Engine(path)
    assert ov.providers == [ovb.PROVIDER_NAME] and ov.describe()["backend"] == "openvino"
    # OpenVINO's own default is bf16 wherever the CPU has it (AVX512_BF16, AMX): ~0.5% off FP32
    assert ov.session.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() == "f32"
    assert [s.to_dict() for s in ov.inputs] == [s.to_dict() for s in ort.inputs]  # "batch" kept by name
    x = np.random.default_rng(1).standard_normal((5, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(ov.run(x)["logits"], ort.run(x)["logits"], rtol=1e-4, atol=1e-4)
    with pytest.raises(InputError, match="axis 1 must be 3"):
        ov.run(x[:, :2])
    with pytest.raises(InputError, match="onnxruntime feature"):
        ov.placement()
    with pytest.raises(InputError, match="runs a model file on the CPU"):
        Engine(path, backend="openvino", providers="cuda")
    routed = Engine(path, backend="openvino", batch_sessions={1: {"threads": 1, "spinning": False},
                                                              8: {"threads": 2, "spinning": False}})
    np.testing.assert_allclose(routed.run(x)["logits"], ort.run(x)["logits"], rtol=1e-4, atol=1e-4)


@needs_openvino
def test_profile_times_one_file_on_openvino_against_another_on_onnxruntime(tmp_path, cli):
    path = _cnn(tmp_path / "cnn.onnx")
    result = cli("profile", path, "--compare", path, "--backend", "openvino", "--backend", "onnxruntime",
                 "--batch", "1", "--seconds", "0.01")
    assert result.exit_code == 0, result.output
    assert f"provider: {ovb.PROVIDER_NAME}, CPUExecutionProvider" in result.output
    assert "threads: openvino default and onnxruntime default" in result.output
    # the same file on two runtimes: a row each, named by backend, the second against the first
    rows = [line.split() for line in result.output.splitlines() if line.startswith("cnn.onnx")]
    assert [r[:3] for r in rows] == [["cnn.onnx", "(openvino)", "1"], ["cnn.onnx", "(onnxruntime)", "1"]]
    assert rows[0][-1] == "-" and rows[1][-1].endswith("x")
    result = cli("profile", path, "--compare", path, "--batch", "1", "--seconds", "0.01")
    assert result.exit_code == 2 and "the same model on the same backend twice" in result.output


@needs_openvino
@pytest.mark.slow  # a (small) search
def test_quantize_measures_the_openvino_twin_without_building_it_again(tmp_path):
    path = _cnn(tmp_path / "cnn.onnx", channels=64, size=32)
    messages: list[str] = []
    config = QuantizeConfig(mode="static", batch_sizes=(8,), rounds=4, max_accuracy_drop=0.5,
                            backends=("onnxruntime", "openvino"), measure_ceiling=False, tune_session=False)
    try:
        report = quantize(path, tmp_path / "cnn.int8.onnx", config, progress=messages.append).report
    except Exception as exc:  # refusing is a legitimate outcome here; the table is what is tested
        report = exc.report
    rows = report.candidates
    ov = [r for r in rows if r.backend == "openvino"]
    assert len(ov) == 1 and ov[0].error is None, rows  # its convolutions have no bias to correct
    twin = next(r for r in rows if r.recipe == ov[0].recipe.removesuffix("/openvino"))
    assert ov[0].integer_nodes == twin.integer_nodes and ov[0].built_from == twin.built_from
    skipped = {s["recipe"]: s["why"] for s in report.skipped_recipes}
    assert skipped[ov[0].recipe.replace("per-channel", "per-channel/bias-corrected")] == \
        "no quantized Conv or Gemm has a bias to correct"
    assert any("run by openvino" in m for m in messages) and ov[0].speedup and ov[0].rel_l2 < 0.2
    if report.chosen is not None:  # the shipped file says where it was measured, and runs there
        from edgepipe.runtime.deployment import MeasuredOn

        record = MeasuredOn.read(tmp_path / "cnn.int8.onnx")
        assert record.backend == report.chosen.backend and record.budget["max_accuracy_drop"] == 0.5
        assert record.backends[report.chosen.backend]["within_budget"]
        assert Engine(tmp_path / "cnn.int8.onnx").backend == report.chosen.backend
        chosen_sessions = {int(b): s for b, s in report.chosen.sessions.items()}
        assert {b: s.to_dict() for b, s in record.sessions.items()} == chosen_sessions


@needs_openvino
def test_a_run_that_chose_openvino_is_deployed_on_it(tmp_path):
    from edgepipe.runtime.deployment import find_deployment

    run = tmp_path / "run"
    (run / "cnn").mkdir(parents=True)
    _cnn(run / "cnn" / "model.int8.onnx")
    chosen = {"backend": "openvino", "sessions": {"1": {"threads": 1, "spinning": False}}}
    manifest = {"schema": 2, "models": {"cnn": {"stages": {"quantize": {"status": "ok", "record": {
        "chosen": chosen, "fp32": {"sessions": {}}}}}}}}
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert find_deployment(run).backend == "openvino"
    engine = Engine.from_run(run)
    assert engine.backend == "openvino"
    assert engine.run_info["sessions_from_run"] == {1: {"threads": 1, "spinning": False}}
    assert Engine.from_run(run, backend="onnxruntime").backend == "onnxruntime"  # the caller's word wins
    assert Engine.from_run(run, providers="cpu").backend == "openvino"


def test_the_summary_says_when_the_chosen_file_is_out_of_budget_on_onnxruntime():
    """A record measured here (the zoo CNN): the OpenVINO row won, and its onnxruntime twin (the
    same file) lost 1.1 points. The summary must say to deploy it on OpenVINO only."""
    from pathlib import Path

    from edgepipe.cli.render import quantize_summary
    from edgepipe.quantize.report import QuantizeReport

    record = json.loads((Path(__file__).parent / "data" / "quantize_record_openvino.json").read_text())
    text = quantize_summary(QuantizeReport.from_dict(record), Path("cnn.int8.onnx"))
    assert "runs on openvino" in text
    assert "for a device with onnxruntime only, quantize with --backend onnxruntime" in text
    assert "on onnxruntime the same file is out of the accuracy budget (accuracy drop 0.0111 > 0.01" in text
    for row in record["candidates"]:  # the twin within budget: nothing to warn about
        if row["backend"] == "onnxruntime" and row["verdict"].startswith("accuracy"):
            row["verdict"] = "ok"
    assert "out of the accuracy budget" not in quantize_summary(QuantizeReport.from_dict(record), Path("x.onnx"))


def _judged(tmp_path, ov_verdict, ort_verdict):
    """The chosen OpenVINO candidate and its onnxruntime file twin as the search leaves them, and
    the file quantize writes for them."""
    from types import SimpleNamespace

    from edgepipe.onnxfile import copy
    from edgepipe.quantize.candidate import Candidate
    from edgepipe.quantize.recipes import Recipe
    from edgepipe.quantize.record import deployment_record
    from edgepipe.runtime.deployment import DEPLOYMENT_KEY
    from edgepipe.runtime.sessions import SessionSetting

    recipe = Recipe("static", "QDQ", per_channel=True, backend="openvino")
    chosen = Candidate(recipe, speedup={8: 1.67}, accuracy_drop=0.02, verdict=ov_verdict,
                       settings={8: SessionSetting(1, False)})
    twin = Candidate(recipe.file_twin, speedup={8: 1.55}, accuracy_drop=0.158, verdict=ort_verdict)
    other = Candidate(Recipe("dynamic"), speedup={8: 0.5}, verdict=Verdict.too_slow({8: 0.5}, 1.05))
    search = SimpleNamespace(config=QuantizeConfig(max_accuracy_drop=0.1), candidates=[other, twin, chosen])
    record = deployment_record(search, chosen)
    path = copy(_cnn(tmp_path / "cnn.onnx"), tmp_path / "cnn.int8.onnx", metadata={DEPLOYMENT_KEY: json.dumps(record)})
    return record, path


@needs_openvino
def test_a_quantized_file_runs_where_it_was_judged_and_is_refused_where_it_is_out_of_budget(tmp_path, cli):
    record, path = _judged(tmp_path, Verdict(CHOSEN), Verdict.accuracy(0.158, 0.1, "81 of 512 rows lost"))
    assert record["backend"] == "openvino" and set(record["backends"]) == {"openvino", "onnxruntime"}
    assert record["backends"]["onnxruntime"]["within_budget"] is False
    engine = Engine(path)  # what an embedder writes: the file's own backend and sessions
    assert engine.backend == "openvino" and engine.batch_sessions == [(8, engine.batch_sessions[0][1])]
    assert engine.batch_sessions[0][1].threads == 1
    with pytest.raises(InputError, match=r"on onnxruntime the same file is out of its budget \(accuracy drop "
                                         r"0.1580 > 0.1.*--allow-out-of-budget"):
        Engine(path, backend="onnxruntime")
    assert Engine(path, backend="onnxruntime", allow_out_of_budget=True).backend == "onnxruntime"
    assert Engine(path, providers="cpu").backend == "openvino"
    for args in (["profile", path, "--batch", "1", "--seconds", "0.05", "--backend", "onnxruntime"],
                 ["triton", path, "-o", tmp_path / "repo", "--backend", "onnxruntime", "--no-validate"]):
        result = cli(*args)
        assert result.exit_code == 2 and "out of its budget" in result.output and "Traceback" not in result.output
    result = cli("profile", path, "--batch", "1", "--seconds", "0.05")
    assert result.exit_code == 0 and "openvino default" in result.output, result.output
    result = cli("triton", path, "-o", tmp_path / "repo", "--no-validate")
    assert result.exit_code == 0 and 'backend: "openvino"' in (tmp_path / "repo" / "cnn" / "config.pbtxt").read_text()


def test_a_file_without_a_record_or_within_budget_everywhere_runs_as_asked(tmp_path):
    path = _cnn(tmp_path / "plain.onnx")
    assert Engine(path).backend == "onnxruntime" and Engine(path).measured_on is None
    _, judged = _judged(tmp_path, Verdict(CHOSEN), Verdict(OK))
    assert Engine(judged, backend="onnxruntime").backend == "onnxruntime"  # within budget there: allowed
