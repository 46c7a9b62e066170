"""Profiling: schema-valid JSON, sweeps, cold start, operators, merge; a torch-free install."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from edgepipe.runtime.profiling import profile_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def schema():
    return json.loads(resources.files("edgepipe.runtime").joinpath("profile.schema.json").read_text())


def test_profile_json_validates_against_its_schema(zoo, schema, tmp_path, cli):
    out = tmp_path / "p.json"
    result = cli("profile", zoo["transformer"].onnx, "--batch", "1,8", "--threads", "1,2", "--ops",
                 "--seconds", "0.05", "--json", out)
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    jsonschema.validate(record, schema)
    assert [run["threads"] for run in record["thread_sweep"]] == [1, 2]
    assert record["operators"]["by_op_type"][0]["op"] == "MatMul"  # where a transformer spends its time
    assert abs(sum(r["share"] for r in record["operators"]["by_op_type"]) - 1.0) < 0.01
    assert "cold start" in result.output and "top operators" in result.output


def test_schema_rejects_a_broken_record(zoo, schema):
    record = profile_model(zoo["mlp"].onnx, (1,), min_time_s=0.01)
    jsonschema.validate(record, schema)
    del record["cold_start"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(record, schema)


def test_merge_profiles_from_several_devices(zoo, tmp_path, cli):
    record = profile_model(zoo["mlp"].onnx, (1, 4), min_time_s=0.01)
    other = json.loads(json.dumps(record))
    other["hardware"]["cpu"]["model"] = "Cortex-A78 (edge board)"
    (tmp_path / "a.json").write_text(json.dumps(record))
    (tmp_path / "b.json").write_text(json.dumps(other))
    result = cli("merge-profiles", tmp_path / "a.json", tmp_path / "b.json", "--json", tmp_path / "m.json")
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "m.json").read_text())["rows"]
    assert len(rows) == 4 and {r["device"].split(" [")[0] for r in rows} == {
        record["hardware"]["cpu"]["model"], "Cortex-A78 (edge board)"}
    (tmp_path / "bad.json").write_text("{}")
    assert cli("merge-profiles", tmp_path / "bad.json").exit_code == 2


@pytest.mark.slow
def test_fresh_venv_with_only_the_base_package_runs_profile(zoo, tmp_path):
    """What a target device gets: `pip install edgepipe` (numpy, onnxruntime, typer), no torch."""
    venv = tmp_path / "device-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run(pip + ["-c", str(ROOT / "constraints.txt"), str(ROOT)], check=True, timeout=600,
                   capture_output=True)
    python = str(venv / "bin" / "python")
    has_torch = subprocess.run([python, "-c", "import torch"], capture_output=True).returncode == 0
    assert not has_torch, "the base install must not pull in torch"
    out = tmp_path / "device.json"
    proc = subprocess.run([str(venv / "bin" / "edgepipe"), "profile", str(zoo["cnn"].onnx), "--batch", "1,4",
                           "--seconds", "0.05", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(out.read_text())["latency"][1]["batch"] == 4


def test_per_operator_times_are_of_warm_calls_and_fit_inside_a_whole_call(tmp_path):
    """A session's first calls start its thread pool and allocate its buffers; averaged in, they
    made an MLP's nodes sum to 3x a whole warm call. The nodes' times, summed, must fit in a
    whole call of the same profiled runs (nodes run one after another), and stay near a whole
    call of an unprofiled session measured in this process."""
    import torch

    from edgepipe.exporters import export
    from edgepipe.exporters.onnx_export import ExportConfig
    from edgepipe.runtime import Engine, measure
    from edgepipe.runtime.placement import node_times, operator_profile, profile_events

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512),
                                torch.nn.ReLU(), torch.nn.Linear(512, 10))
    path = export(model, tmp_path / "mlp.onnx", ExportConfig(exporters=("torchscript",)),
                  inputs=["x:float32:batch,64"]).artifacts["onnx"]
    feeds = {"x": np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32)}
    events = profile_events(path, feeds, ["CPUExecutionProvider"], iterations=30, warmup=10)
    assert sum(e.get("name") == "model_run" for e in events) == 40  # ten warm-up calls ran ...
    assert {len(n["runs_us"]) for n in node_times(events).values()} == {30}  # ... and are left out
    operators = operator_profile(path, feeds, providers="cpu")
    whole_us = measure(Engine(path, providers="cpu").runner(feeds), 32).p50_ms * 1000
    nodes_us = sum(r["us_per_run"] for r in operators["by_op_type"])
    assert nodes_us <= 1.1 * operators["run_us_p50"], (nodes_us, operators["run_us_p50"], operators["by_node"])
    assert nodes_us <= 2 * whole_us, (nodes_us, whole_us)
