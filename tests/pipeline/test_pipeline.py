"""Pipeline: config validation, gates that fail, manifest, resume, the demo end to end."""

from __future__ import annotations

import json
import textwrap

import pytest

from edgepipe.artifacts import sha256
from edgepipe.errors import ConfigError
from edgepipe.pipeline import config as config_mod
from edgepipe.pipeline import run_pipeline

FAST_MLP = textwrap.dedent("""
    out_dir = "run"
    stages = ["train", "export"]
    [train]
    epochs = 2
    [export]
    exporters = ["torchscript"]
    [[models]]
    name = "mlp"
    dataset = "digits"
    budgets = {{ min_accuracy = {min_accuracy} }}
""")


def write_config(tmp_path, text):
    path = tmp_path / "pipeline.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ('stages = ["train", "deploy"]\n[[models]]\nname = "mlp"', "unknown stage(s) deploy"),
    ('[[models]]\nname = "resnet"', "'resnet' is not in the zoo"),
    ('[train]\nepoch = 3\n[[models]]\nname = "mlp"', "unknown key(s) epoch in [mlp.train]"),
    ('[quantize]\nmode = "fast"\n[[models]]\nname = "mlp"', "quantize mode 'fast' unknown"),
    ('out_dir = "x"', "lists no [[models]]"),
    ('[[models]]\nname = "mlp"\n[[models]]\nname = "mlp"', "unique"),
    ("this is = = not toml", "not valid TOML"),
])
def test_config_errors_are_specific(tmp_path, text, message):
    with pytest.raises(ConfigError) as err:
        config_mod.load(write_config(tmp_path, text))
    assert message in str(err.value)


def test_a_gpu_quantize_must_be_profiled_on_the_gpu(tmp_path, monkeypatch):
    import onnxruntime as ort

    available = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers", lambda: [*available, "CUDAExecutionProvider"])
    text = '[quantize]\ndevice = "cuda"\n[profile]\nproviders = "{}"\n[[models]]\nname = "mlp"'
    with pytest.raises(ConfigError, match="quantize device = 'cuda' measures the model on the GPU, but profile "
                                          "providers = 'cpu'"):
        config_mod.load(write_config(tmp_path, text.format("cpu")))
    for providers in ("cuda", "auto"):
        assert config_mod.load(write_config(tmp_path, text.format(providers)))


def test_violated_gate_exits_1_naming_measured_value_and_budget(tmp_path, cli):
    path = write_config(tmp_path, FAST_MLP.format(min_accuracy=0.999))
    result = cli("run", path)
    assert result.exit_code == 1, result.output
    assert "min_accuracy" in result.output and "violates" in result.output and "0.999" in result.output
    assert "FAIL min_accuracy" in result.output  # in the table too
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "failed"
    assert not (tmp_path / "run" / "mlp" / "model.onnx").exists()  # later stages did not run


def test_manifest_records_hashes_versions_and_resume_reuses(tmp_path):
    cfg = config_mod.load(write_config(tmp_path, FAST_MLP.format(min_accuracy=0.5)))
    first = run_pipeline(cfg)
    assert first.ok
    manifest = first.manifest
    assert manifest["versions"]["onnxruntime"] and manifest["versions"]["torch"]
    assert manifest["hardware"]["cpu"]["features"] is not None
    assert manifest["config"]["models"][0]["name"] == "mlp"
    stages = manifest["models"]["mlp"]["stages"]
    for stage in ("train", "export"):
        for out in stages[stage]["outputs"]:
            assert sha256(cfg.out_dir / out["path"]) == out["sha256"]
    assert stages["export"]["inputs"][0]["sha256"] == stages["train"]["outputs"][0]["sha256"]
    assert stages["export"]["record"]["parity"]["ok"]

    logs = []
    second = run_pipeline(config_mod.load(write_config(tmp_path, FAST_MLP.format(min_accuracy=0.5))),
                          resume=True, log=logs.append)
    assert second.ok and sum("reused" in line for line in logs) == 2

    (cfg.out_dir / "mlp" / "model.onnx").write_bytes(b"tampered")
    logs.clear()
    run_pipeline(cfg, resume=True, log=logs.append)
    assert any("train: reused" in line for line in logs)
    assert not any("export: reused" in line for line in logs)  # hash mismatch: re-exported
    assert not list(cfg.out_dir.rglob("*.tmp"))


def test_bad_input_in_a_stage_names_the_stage(tmp_path, cli):
    (tmp_path / "broken.py").write_text("def build():\n    raise FileNotFoundError('weights.pt')\n")
    text = 'out_dir = "run"\nstages = ["export"]\n[[models]]\nname = "mine"\nsource = "broken.py:build"\n'
    result = cli("run", write_config(tmp_path, text))
    assert result.exit_code == 2
    assert "stage 'export' of model 'mine' failed" in result.output and "raised FileNotFoundError" in result.output
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "error"  # never left "running"


@pytest.mark.slow
@pytest.mark.timeout(900)  # the demo's every stage for every zoo model
def test_demo_end_to_end(tmp_path, cli):
    """The README quickstart: `edgepipe demo` trains, exports, quantizes and profiles the zoo."""
    out = tmp_path / "demo"
    result = cli("demo", "--out", out)
    assert result.exit_code == 0, result.output[-2500:]  # the tail holds the table and the gate
    assert "all gates passed" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "passed"
    from edgepipe.runtime import Engine
    from edgepipe.runtime.sessions import route_batch

    quantized = 0
    for name in ("mlp", "cnn", "lstm", "transformer"):
        assert name in result.output
        model = manifest["models"][name]
        deployed, decided = Engine.from_run(out, name).run_info["artifact"], model["deployment"]
        # Where no INT8 candidate is clearly faster on this CPU (small models without VNNI can sit
        # near 1.0x), quantize refuses, writes nothing, and the demo (require_int8 = false) ships FP32
        if model["stages"]["quantize"]["status"] == "refused":
            assert not (out / name / "model.int8.onnx").exists() and deployed == "model.onnx", name
            assert decided["precision"] == "fp32" and "require_int8 = false" in decided["why"], (name, decided)
            continue
        quantized += 1
        assert (out / name / "model.int8.onnx").exists(), name
        quant, prof = model["stages"]["quantize"]["record"], model["stages"]["profile"]["record"]
        # The demo deploys INT8 only where profile measured it not slower (require_int8 = false)
        # at the batch sizes quantize judged (the deployment's)
        speedup = prof["speedup"]["int8"]
        at_deploy = min(speedup[b] for b in quant["fp32"]["p50_ms"] if b in speedup)
        assert deployed == ("model.int8.onnx" if decided["precision"] == "int8" else "model.onnx"), name
        assert (at_deploy < 1.0) is (decided["precision"] == "fp32"), (name, at_deploy, decided)
        for label, tuned in (("fp32", quant["fp32"]["sessions"]), ("int8", quant["chosen"]["sessions"])):
            used = prof["models"][label]["sessions"]
            assert used == {b: tuned[str(route_batch(map(int, tuned), int(b)))] for b in used}, (name, label)
    assert quantized >= 2, "the MLP and the transformer quantize on every CPU this project runs on"
    table = (out / "report.md").read_text().split("## What each stage cost")
    assert table[0].count("| transformer |") == 3 and table[1].count("| transformer |") == 4  # + what each cost


@pytest.mark.slow
def test_train_prune_export_quantize_reports_each_step_and_the_cumulative_result(tmp_path, cli):
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "prune_pipeline.toml"
    out = tmp_path / "prune-run"
    result = cli("run", example, "--out", out)
    assert result.exit_code == 0, result.output[-2500:]
    for row in ("prune (structured", "export (", "quantize (", "cumulative vs unpruned FP32"):
        assert row in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    for name in ("cnn", "mlp"):
        stages = manifest["models"][name]["stages"]
        assert stages["prune"]["record"]["speedup"]["32"] >= 1.5
        # export consumed the pruned checkpoint, not the trained one
        assert stages["export"]["inputs"][0]["sha256"] == stages["prune"]["outputs"][0]["sha256"]
        assert stages["profile"]["record"]["cumulative_speedup"]["32"] > 1.5


@pytest.mark.slow
def test_profile_deploys_fp32_when_int8_measures_slower_and_int8_is_optional(tmp_path, monkeypatch):
    """Quantize's timing and profile's can disagree; profile decides. With require_int8 = false
    a slower INT8 model is not deployed (and nothing fails); with require_int8 = true the gate fails."""
    import edgepipe.pipeline.profile_stage as profile_stage
    from edgepipe.runtime import Engine

    real = profile_stage.compare_models

    def int8_slower(models, *args, **kwargs):
        record = real(models, *args, **kwargs)
        if "int8" in record["speedup"]:
            record["speedup"]["int8"] = {b: 0.8 for b in record["speedup"]["int8"]}
        return record

    monkeypatch.setattr(profile_stage, "compare_models", int8_slower)
    text = textwrap.dedent("""
        out_dir = "run"
        stages = ["train", "export", "quantize", "profile"]
        [train]
        epochs = 2
        [export]
        exporters = ["torchscript"]
        [quantize]
        batch_sizes = [32]
        [profile]
        batch_sizes = [32]
        [budgets]
        require_int8 = {require}
        min_int8_speedup = 1.0
        [[models]]
        name = "mlp"
        dataset = "digits"
    """)
    result = run_pipeline(config_mod.load(write_config(tmp_path, text.format(require="false"))))
    assert result.ok, result.table()
    stages = result.manifest["models"]["mlp"]["stages"]
    decided = result.manifest["models"]["mlp"]["deployment"]
    assert stages["quantize"]["status"] == "ok" and decided["precision"] == "fp32" and "0.800x" in decided["why"]
    assert stages["profile"]["record"]["speedup"]["int8"] == {"32": 0.8}  # measured, on record
    assert Engine.from_run(tmp_path / "run", "mlp").run_info["artifact"] == "model.onnx"
    assert "slower in profile: FP32 kept" in result.table()

    strict = run_pipeline(config_mod.load(write_config(tmp_path, text.format(require="true").replace(
        'out_dir = "run"', 'out_dir = "strict"'))))
    assert not strict.ok
    assert any(g["gate"] == "min_int8_speedup" for g in strict.failed_gates)


def test_every_problem_of_a_config_is_named_at_once(tmp_path, cli):
    text = ('stages = ["export", "deploy"]\n[train]\nepoch = 3\n[quantize]\nmode = "fast"\n'
            '[[models]]\nname = "mlp"\nsource = "missing.pt"\n[[models]]\nname = "cnn"\n')
    with pytest.raises(ConfigError) as err:
        config_mod.load(write_config(tmp_path, text))
    message = str(err.value)
    for part in ("unknown stage(s) deploy", "unknown key(s) epoch in [cnn.train]", "quantize mode 'fast' unknown",
                 "source = 'missing.pt': file not found"):
        assert part in message, message
    assert message.startswith("3 problems: ") and "\n" not in message  # the model cnn names two
    result = cli("run", write_config(tmp_path, text))
    assert result.exit_code == 2 and result.output.count("error: ") == 1
