"""Session settings (intra-op threads, spinning): swept per model and batch size, routed by the
Engine, recorded by quantize and applied by profile and Engine.from_run."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from edgepipe.quantize import QuantizeConfig, quantize
from edgepipe.runtime import Engine, SessionSetting, fastest_per_batch, session_settings
from edgepipe.runtime.sessions import route_batch

ONE, TWO, TWO_SPIN = SessionSetting(1, False), SessionSetting(2, False), SessionSetting(2, True)


def test_settings_swept_are_one_thread_and_all_cores_and_spinning_is_opt_in():
    assert session_settings(cores=2) == [ONE, TWO]
    assert session_settings(cores=1) == [ONE]
    assert session_settings(threads=3, cores=8) == [SessionSetting(3, False)]  # the user pinned threads
    assert session_settings(cores=2, spinning=True) == [ONE, TWO, TWO_SPIN]


def test_fastest_setting_is_picked_per_batch_size():
    p50 = {1: {ONE: 0.05, TWO: 0.20}, 32: {ONE: 1.0, TWO: 0.6}, 64: {ONE: 1.0, TWO: 1.0}}
    assert fastest_per_batch(p50) == {1: ONE, 32: TWO, 64: ONE}  # a tie keeps fewer threads


def test_a_batch_goes_to_the_smallest_configured_batch_that_holds_it():
    assert [route_batch([1, 32], n) for n in (1, 2, 32, 33, 500)] == [1, 32, 32, 32, 32]


def test_engine_routes_each_batch_to_its_own_session_with_identical_results(zoo):
    path = zoo["mlp"].onnx
    routed = Engine(path, providers="cpu", batch_sessions={1: ONE, 32: {"threads": 2, "spinning": False}})
    plain = Engine(path, providers="cpu")
    small, large = routed.session_for(1), routed.session_for(40)
    assert small is not large and routed.session_for(7) is large
    assert routed.session is small  # no third session, holding the weights again, that no batch runs on
    assert small.get_session_options().intra_op_num_threads == 1
    assert large.get_session_options().intra_op_num_threads == 2
    x = zoo["mlp"].dataset.x_test
    for rows in (1, 5, 40):
        np.testing.assert_allclose(routed.run(x[:rows])["logits"], plain.run(x[:rows])["logits"], atol=1e-5)
    assert routed.describe()["batch_sessions"] == {1: ONE.to_dict(), 32: TWO.to_dict()}


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="spinning needs a second core")
def test_wait_until_idle_outlasts_spinning_workers(zoo):
    """In a fresh process: in the test session, threads other tests left behind (servers, Ray,
    other runtimes' pools) can wake within the window and be counted as the workers' spin."""
    import subprocess
    import sys

    code = ("import json, sys, time\n"
            "import numpy as np\n"
            "from edgepipe.runtime import Engine\n"
            "from edgepipe.runtime.timing import wait_until_idle\n"
            "engine = Engine(sys.argv[1], providers='cpu', threads=2, spinning=True)\n"
            "x = np.load(sys.argv[2])\n"
            "def busy_ms(wait):\n"
            "    for _ in range(20):\n"
            "        engine.run(x)\n"
            "    waited = wait_until_idle() if wait else 0.0\n"
            "    cpu = time.process_time()\n"
            "    time.sleep(0.03)\n"
            "    return (time.process_time() - cpu) * 1000, waited\n"
            "print(json.dumps({'waited': busy_ms(True), 'not_waited': busy_ms(False)}))\n")
    rows = zoo["mlp"].onnx.with_name("idle_rows.npy")
    np.save(rows, zoo["mlp"].dataset.x_test[:32])
    out = subprocess.run([sys.executable, "-c", code, str(zoo["mlp"].onnx), str(rows)],
                         capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    busy, waited = result["waited"]
    assert busy < 5.0, f"workers still busy after wait_until_idle: {result}"
    assert waited < 0.5
    # without the wait the spinning workers are caught at it (what makes the first check mean something)
    assert result["not_waited"][0] > busy, result


@pytest.mark.slow
def test_quantize_records_each_models_fastest_setting_per_batch(zoo):
    model = zoo["lstm"]
    data = model.dataset
    from edgepipe.quantize import EvalData

    record = quantize(model.onnx, model.onnx.parent / "swept.int8.onnx", QuantizeConfig(batch_sizes=(1, 32)),
                      eval_data=EvalData({data.input_name: data.x_test}, data.y_test)).record
    swept = session_settings()
    for row in [record["fp32"]] + [c for c in record["candidates"] if c["p50_ms_by_session"]]:
        assert [SessionSetting.from_dict(r) for r in row["p50_ms_by_session"]] == swept
        for batch, chosen in row["sessions"].items():
            at = {SessionSetting.from_dict(r): r["p50_ms"][batch] for r in row["p50_ms_by_session"]}
            assert at[SessionSetting.from_dict(chosen)] == min(at.values())  # the fastest was kept
    fp32_at = {SessionSetting.from_dict(r): r["p50_ms"] for r in record["fp32"]["p50_ms_by_session"]}
    assert record["fp32"]["p50_ms"] == {b: min(v[b] for v in fp32_at.values()) for b in ("1", "32")}
    assert set(record["chosen"]["sessions"]) == {"1", "32"}


def test_no_tune_session_times_only_all_cores(zoo):
    model = zoo["mlp"]
    data = model.dataset
    from edgepipe.quantize import EvalData

    record = quantize(model.onnx, model.onnx.parent / "untuned.int8.onnx",
                      QuantizeConfig(batch_sizes=(32,), tune_session=False, rounds=4),
                      eval_data=EvalData({data.input_name: data.x_test}, data.y_test)).record
    assert [r["threads"] for r in record["fp32"]["p50_ms_by_session"]] == [os.cpu_count()]


def test_from_run_applies_the_recorded_settings_unless_told_otherwise(tmp_path, zoo):
    run = tmp_path / "run"
    (run / "mlp").mkdir(parents=True)
    (run / "mlp" / "model.onnx").write_bytes(zoo["mlp"].onnx.read_bytes())
    sessions = {"1": ONE.to_dict(), "32": TWO.to_dict()}
    manifest = {"models": {"mlp": {"stages": {"quantize": {"status": "refused", "record": {
        "fp32": {"sessions": sessions}}}}}}}
    (run / "manifest.json").write_text(json.dumps(manifest))
    engine = Engine.from_run(run, "mlp")
    assert engine.batch_sessions == [(1, ONE), (32, TWO)]
    assert engine.run_info["sessions_from_run"] == {1: ONE.to_dict(), 32: TWO.to_dict()}
    assert Engine.from_run(run, "mlp", threads=1).batch_sessions == []  # the caller's threads win
    spin_off = Engine.from_run(run, "mlp", spinning=True)  # e.g. serve --spin: kept per batch
    assert [s.spinning for _, s in spin_off.batch_sessions] == [True, True]


def test_auto_skips_tensorrt_when_its_libraries_are_missing(monkeypatch):
    """onnxruntime-gpu lists TensorRT even without libnvinfer (measured on an H100 machine with
    CUDA but no TensorRT): "auto" must go to CUDA, not through TensorRT's load failure."""
    from edgepipe.runtime import sessions

    listed = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(sessions.ort, "get_available_providers", lambda: listed)
    monkeypatch.setattr(sessions, "_TENSORRT_LIBS", [False])
    assert sessions.resolve_providers("auto") == (["CUDAExecutionProvider", "CPUExecutionProvider"], [])
    assert sessions.resolve_providers("tensorrt") == (["TensorrtExecutionProvider"], [])  # asked for: tried
    monkeypatch.setattr(sessions, "_TENSORRT_LIBS", [True])
    assert sessions.resolve_providers("auto")[0] == listed


SHARED_ARENA_CODE = """
import json, sys
import numpy as np
import onnx
from onnx import TensorProto, helper
from edgepipe.runtime.sessions import new_session, shared_cpu_arena

# six Relu steps over [16, 1M] floats: 64 MB per intermediate tensor, an arena of a few of them
nodes = [helper.make_node("Relu", [f"t{i}"], [f"t{i + 1}"]) for i in range(6)]
graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("t0", TensorProto.FLOAT, ["b", 1 << 20])],
                          [helper.make_tensor_value_info("t6", TensorProto.FLOAT, ["b", 1 << 20])])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9).SerializeToString()
x = np.ones((16, 1 << 20), np.float32)

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

def held(make):
    before = rss_mb()
    sessions = [make() for _ in range(6)]
    for s in sessions:  # one at a time, as a search times them
        s.run(None, {"t0": x})
    return rss_mb() - before

apart = held(lambda: new_session(model))
with shared_cpu_arena():
    shared = held(lambda: new_session(model))
print(json.dumps({"apart": apart, "shared": shared}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads resident memory from /proc (Linux)")
def test_sessions_made_in_a_shared_arena_block_hold_one_runs_memory_not_one_per_session():
    """A search holds a session per candidate and thread setting and runs them one at a time:
    each with its own arena held its own peak (MobileNetV2 at batch 8: 890 MB for 12 sessions,
    293 MB shared). In a fresh process, so the test session's heap does not blur the figures."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", SHARED_ARENA_CODE], capture_output=True, text=True, check=True)
    held = json.loads(out.stdout.strip().splitlines()[-1])
    # apart: six arenas of at least one 64 MB tensor each; shared: one arena, reused six times
    assert held["apart"] > 6 * 64, held
    assert held["shared"] < held["apart"] / 2, held


def test_a_shared_arena_is_used_inside_its_block_only_and_leaves_results_unchanged():
    from onnx import TensorProto, helper, numpy_helper

    from edgepipe.runtime.sessions import new_session, shared_cpu_arena

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
                               helper.make_node("Relu", ["c"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8, 32, 32])],
                              [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9).SerializeToString()
    x = {"x": rng.standard_normal((4, 3, 32, 32)).astype(np.float32)}
    plain = new_session(model)
    with shared_cpu_arena():
        shared = new_session(model)
        assert shared.get_session_options().get_session_config_entry("session.use_env_allocators") == "1"
        np.testing.assert_array_equal(shared.run(None, x)[0], plain.run(None, x)[0])
    after = new_session(model)
    with pytest.raises(RuntimeError, match="does not have configuration"):  # never set outside the block
        after.get_session_options().get_session_config_entry("session.use_env_allocators")
