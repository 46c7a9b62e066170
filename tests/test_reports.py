"""Typed stage reports, verdicts and gates: no model needed (the fast tier)."""

from __future__ import annotations

import pytest

from edgepipe.errors import GateFailed, InputError, LatencyError
from edgepipe.models.report import TrainReport
from edgepipe.pipeline.config import Budgets
from edgepipe.pipeline.deploy import Decision, decide, int8_rejection, int8_speedup
from edgepipe.pipeline.gates import check
from edgepipe.pipeline.profile_stage import ProfileReport
from edgepipe.prune.report import PruneReport
from edgepipe.quantize.report import Baseline, CandidateRow, QuantizeReport
from edgepipe.quantize.verdict import CHOSEN, FAILED, OK, SUPERSEDED, Verdict

INT8 = Decision("int8")


def candidate(recipe="static-QDQ/AU8WS8/minmax/per-tensor", drop=0.0, verdict="chosen") -> CandidateRow:
    return CandidateRow(recipe=recipe, method="static", format="QDQ", activation_type="U8", weight_type="S8",
                        per_channel=False, calibration="minmax", reduce_range=False, excluded_nodes=[],
                        integer_nodes=4, built_from="pre_full.onnx", accuracy=0.97 - drop, agreement=None,
                        accuracy_drop=drop, rel_l2=0.01, cosine=0.9999, rows_lost=0, rows_gained=0,
                        p50_ms={"32": 0.1}, speedup={"32": 1.8}, speedup_trials=None,
                        sessions={"32": {"threads": 2, "spinning": False}}, p50_ms_by_session=None,
                        size_bytes=1000, error=None, verdict=verdict)


def quantize_report(chosen: CandidateRow | None) -> QuantizeReport:
    return QuantizeReport(
        cpu={"model": "x", "features": [], "vnni": False}, recipe_reason="r", preprocess=[],
        transformer_optimizer={"tried": False}, skipped_recipes=[],
        fp32=Baseline(accuracy=0.97, p50_ms={"32": 0.18}, sessions={"32": {"threads": 2, "spinning": False}},
                      p50_ms_by_session=[], size_bytes=4000),
        accuracy_fallback=[], budget={"max_accuracy_drop": 0.01}, timing="t",
        candidates=[chosen] if chosen else [], chosen=chosen, size_bytes=1000 if chosen else None, seconds=1.0)


def profile_report(int8: dict[str, float]) -> ProfileReport:
    return ProfileReport(models={}, baseline="fp32", latency={}, speedup={"int8": int8}, threads="ort-default",
                         intra_op_spinning=False, trials=3, hardware={})


def test_a_report_round_trips_through_json_with_nested_reports():
    report = quantize_report(candidate())
    data = report.to_dict()
    assert isinstance(data["fp32"], dict) and isinstance(data["chosen"], dict)
    back = QuantizeReport.from_dict(data)
    assert back == report and isinstance(back.chosen, CandidateRow) and isinstance(back.fp32, Baseline)
    assert back.deployed_sessions == {"32": {"threads": 2, "spinning": False}}


def test_optional_fields_are_left_out_when_unset_and_a_refusal_has_no_chosen_key():
    data = quantize_report(None).to_dict()
    assert "chosen" not in data and "size_bytes" not in data
    assert QuantizeReport.from_dict(data).chosen is None
    pruned = PruneReport(method="structured", config={}, steps=[], accuracy_before=1.0, accuracy_after=0.99,
                         accuracy_drop=0.01, params_before=10, params_after=5, macs_before=10, macs_after=5,
                         p50_ms={}, structure=None, speedup={"32": 1.5})
    assert "sparsity" not in pruned.to_dict() and pruned.to_dict()["speedup"] == {"32": 1.5}


def test_a_record_missing_a_required_field_is_refused_with_its_name():
    data = TrainReport("cnn", {}, 0.9, 0.1, 1.0, 100).to_dict()
    del data["test_accuracy"]
    with pytest.raises(InputError, match="train record has no 'test_accuracy'"):
        TrainReport.from_dict(data)
    with pytest.raises(InputError, match="must be a JSON object"):
        TrainReport.from_dict(["not", "a", "record"])


@pytest.mark.parametrize("verdict, text, ok", [
    (Verdict(OK), "ok", True),
    (Verdict(CHOSEN), "chosen", True),
    (Verdict(FAILED), "failed", False),
    (Verdict.accuracy(0.031, 0.01), "accuracy drop 0.0310 > 0.01", False),
    (Verdict.accuracy(0.05, 0.02, "/2/Gemm stays FP32"), "accuracy drop 0.0500 > 0.02: /2/Gemm stays FP32", False),
    (Verdict.too_slow({1: 0.98, 32: 1.01}, 1.05), "not clearly faster (needs >= 1.05x) at batch 1 (0.98x), 32 (1.01x)",
     False),
    (Verdict.slower_in_a_trial({1: 0.93}, 1.0), "slower than FP32 in one trial at batch 1 (0.93x)", False),
    (Verdict.too_slow({1: 0.9}, 1.05).unconfirmed(2), "not confirmed in 2 more trials: not clearly faster "
                                                      "(needs >= 1.05x) at batch 1 (0.90x)", False),
    (Verdict(SUPERSEDED, detail="/2/Gemm"), "superseded: /2/Gemm can stay INT8", False),
])
def test_verdicts_are_objects_that_become_text_only_when_printed(verdict, text, ok):
    assert str(verdict) == text and bool(verdict) is ok
    assert verdict.inaccurate is text.startswith("accuracy")
    assert Verdict.too_slow({1: 0.9, 32: 0.8}, 1.05).measured == 0.8  # the worst batch


def test_a_refusal_carries_its_report_as_a_declared_attribute():
    report = quantize_report(None)
    error = LatencyError("no candidate", report=report)
    assert isinstance(error, GateFailed) and error.report is report and error.exit_code == 1
    assert GateFailed("plain").report is None


def test_gates_read_typed_reports_at_the_deployment_batch_sizes():
    reports = {"train": TrainReport("mlp", {}, 0.97, 0.1, 1.0, 100),
               "quantize": quantize_report(candidate(drop=0.02)),
               "profile": profile_report({"1": 0.9, "32": 1.6})}
    budgets = Budgets(min_accuracy=0.9, max_accuracy_drop=0.01, min_int8_speedup=1.0, max_model_size_mb=0.002,
                      max_total_accuracy_drop=0.05)
    results = {g.gate: g for g in check(reports, budgets, (32,), ("train", "export", "quantize", "profile"), INT8)}
    assert results["min_accuracy"].ok and results["min_accuracy"].measured == 0.97
    assert not results["max_accuracy_drop"].ok and results["max_accuracy_drop"].measured == 0.02
    assert results["min_int8_speedup"].ok and results["min_int8_speedup"].measured == 1.6  # batch 1 not deployed
    assert results["max_model_size_mb"].measured == pytest.approx(0.001)
    assert results["max_total_accuracy_drop"].measured == pytest.approx(0.02)
    at_both = {g.gate: g for g in check(reports, budgets, (1, 32), ("profile",), INT8)}
    assert not at_both["min_int8_speedup"].ok and at_both["min_int8_speedup"].measured == 0.9


def test_when_profile_keeps_fp32_the_gates_judge_the_fp32_model():
    from edgepipe.exporters.report import ExportReport

    export = ExportReport(exporter="dynamo", attempts=[], parity={}, opset=18, ir_version=10, size_bytes=4000,
                          inputs=[], outputs=["y"], source="zoo:mlp")
    reports = {"train": TrainReport("mlp", {}, 0.97, 0.1, 1.0, 100), "export": export,
               "quantize": quantize_report(candidate(drop=0.02)), "profile": profile_report({"32": 0.8})}
    budgets = Budgets(max_accuracy_drop=0.01, max_model_size_mb=0.002, max_total_accuracy_drop=0.01,
                      require_int8=False, min_int8_speedup=1.0)
    kept = decide(reports, budgets, (32,))
    assert kept.precision == "fp32" and "0.800x" in kept.why
    results = {g.gate: g for g in check(reports, budgets, (32,), ("train", "export", "quantize", "profile"), kept)}
    assert not results["max_model_size_mb"].ok and results["max_model_size_mb"].measured == pytest.approx(0.004)
    assert "max_accuracy_drop" not in results  # the INT8 model's drop does not matter: it is not deployed
    assert results["max_total_accuracy_drop"].ok
    assert "min_int8_speedup" not in results  # INT8's 0.8x is on record, but FP32 is what ships


def test_the_deployment_decision_is_made_in_one_place():
    slow = profile_report({"1": 0.95, "32": 1.2})
    assert int8_speedup(slow, (1, 32)) == 0.95 and int8_speedup(slow, (64,)) == 0.95  # none profiled: all
    assert int8_speedup(profile_report({}), (1,)) is None
    relaxed = Budgets(require_int8=False, min_int8_speedup=1.0)
    assert "FP32 model is deployed" in int8_rejection(slow, relaxed, (1, 32))
    assert int8_rejection(slow, relaxed, (32,)) is None  # fast where it is deployed
    assert int8_rejection(slow, Budgets(require_int8=True, min_int8_speedup=1.0), (1,)) is None  # gate fails
    quant = quantize_report(candidate())
    assert decide({"quantize": quant}, relaxed, (1,)) == Decision("int8")  # before profile: quantize's word
    assert decide({"quantize": quant, "profile": slow}, relaxed, (1,)).precision == "fp32"
    assert decide({"quantize": quant, "profile": slow}, relaxed, (32,)) == Decision("int8")
    refused = decide({"quantize": quantize_report(None)}, relaxed, (1,), "no candidate within budget")
    assert refused == Decision("fp32", "no candidate within budget") and decide({}, relaxed, (1,)) == Decision("fp32")
