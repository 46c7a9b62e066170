"""The core both quantize searches share (quantize/core.py): the clock, the choice rule, and the
decoder search's verdicts as it records them on that core. No model is built here."""

from __future__ import annotations

import time

import numpy as np

from edgepipe.quantize.core import Clock, needed_speedup, pick


def test_the_choice_is_the_fastest_unless_one_within_the_band_is_more_faithful():
    speed = {"a": 2.00, "b": 1.92, "c": 1.50}
    error = {"a": 0.05, "b": 0.02, "c": 0.001}
    chosen = pick("abc", 1.05, speed=speed.get, error=error.get)
    assert chosen == "b"  # 1.92 x 1.05 >= 2.00 and more faithful; c is faithful but far slower
    assert pick("abc", 1.0, speed=speed.get, error=error.get) == "a"  # no band: the fastest
    assert pick([], 1.05, speed=speed.get, error=error.get) is None
    assert needed_speedup(1.0, 0.05) == 1.05


def test_the_clock_counts_phases_and_the_budget():
    clock = Clock(0)  # 0: no limit
    assert clock.budget_s is None and not clock.out_of_time() and clock.left() is None
    clock = Clock(10.0, started=time.perf_counter() - 6.0)
    assert clock.out_of_time(0.5) and not clock.out_of_time(0.7)
    assert clock.out_of_time(0.7, ahead=2.0)  # a step estimated at 2 s would end past 70%
    assert 3.9 < clock.left() < 4.1
    for _ in range(2):
        with clock.phase("build"):
            time.sleep(0.01)
    assert clock.phases["build"] >= 0.02  # repeats add up


def _measured(nll: float, agreement: float, tpot: float) -> dict:
    return {"nll": nll, "_nll_windows": np.full(4, nll), "agreement": agreement, "tpot_ms": {"1": tpot},
            "size_bytes": 100}


def test_the_decoder_search_judges_and_picks_with_the_shared_verdicts_and_rule():
    from edgepipe.quantize.decoder import DecoderCandidate, DecoderQuantizeConfig, _judge, _refusal
    from edgepipe.quantize.decoder_build import BY_NAME
    from edgepipe.quantize.verdict import OUT_OF_TIME, Verdict

    config = DecoderQuantizeConfig(max_nll_increase=0.1, min_agreement=0.9)
    fp32 = _measured(2.0, 1.0, 10.0)
    rows = {"int4-rtn-b32-acc4": (2.05, 0.95, 5.0),  # 2.0x, +0.05 nats
            "int4-rtn-b128-acc4": (2.01, 0.97, 5.1),  # 1.96x: within 5% of 2.0x, and more faithful
            "int4-rtn-b32": (2.5, 0.99, 4.0),  # fastest, but out of the perplexity budget
            "int8-dynamic": (2.0, 1.0, 9.8)}  # 1.02x: under the 1.05x needed
    cands = []
    for name, (nll, agreement, tpot) in rows.items():
        cand = DecoderCandidate(BY_NAME[name], measured=_measured(nll, agreement, tpot))
        _judge(cand, fp32, config)
        cands.append(cand)
    texts = [str(c.verdict) for c in cands]
    assert texts[:2] == ["ok", "ok"]
    assert texts[2] == "quality: perplexity +0.500 nats/token > 0.1" and cands[2].verdict.inaccurate
    assert texts[3] == "not clearly faster (needs >= 1.05x) at batch 1 (1.02x)"
    chosen = pick((c for c in cands if c.verdict), 1 + config.speedup_margin,
                  speed=lambda c: c.slowest, error=lambda c: c.nll_increase)
    assert chosen.recipe.name == "int4-rtn-b128-acc4"
    row = cands[0].row()
    assert row["verdict"] == "ok" and row["speedup"] == {"1": 2.0} and "_nll_windows" not in row
    skipped = DecoderCandidate(BY_NAME["int4-gptq-b128-acc4"], verdict=Verdict(OUT_OF_TIME, threshold=900.0))
    assert skipped.row()["verdict"] == "skipped: time budget (900 s; raise --time-budget to try it)"
    # a fast candidate that lost quality makes the refusal about quality, not speed
    assert type(_refusal(cands[2:], None, config)).__name__ == "AccuracyError"
    assert type(_refusal(cands[3:], None, config)).__name__ == "LatencyError"
