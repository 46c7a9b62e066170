"""Pipeline runs that can be trusted: resume that cannot reuse stale results, config errors
before any work, one run per output folder, held-out rows said and recorded, profile dims."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from run_helpers import export_config, factory_dir, wait_for

from edgepipe.errors import ConfigError
from edgepipe.pipeline import config as config_mod
from edgepipe.pipeline import run_pipeline


def resumed(config: Path) -> list[str]:
    logs: list[str] = []
    run_pipeline(config_mod.load(config), resume=True, log=logs.append)
    return logs


def test_resume_redoes_a_stage_when_the_weights_a_factory_loads_change(tmp_path):
    from edgepipe.runtime import Engine

    config = export_config(factory_dir(tmp_path))
    run_pipeline(config_mod.load(config))
    assert any("export: reused" in line for line in resumed(config))  # nothing changed: reused
    weights = torch.load(tmp_path / "weights.pt", weights_only=True)
    weights["2.weight"] = -weights["2.weight"]  # the sign of the last layer flipped; model.py unchanged
    weights["2.bias"] = -weights["2.bias"]
    torch.save(weights, tmp_path / "weights.pt")
    assert not any("export: reused" in line for line in resumed(config))
    x = np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    model.load_state_dict(weights)
    expected = model(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(Engine(tmp_path / "run/mine/model.onnx").run(x)["logits"], expected, atol=1e-4)


def test_resume_redoes_a_stage_when_the_data_or_the_config_changes(tmp_path):
    config = export_config(factory_dir(tmp_path))
    run_pipeline(config_mod.load(config))
    data = dict(np.load(tmp_path / "data.npz"))
    np.savez(tmp_path / "data.npz", x=data["x"], y=(data["y"] + 1) % 3)  # every label shifted
    assert not any("export: reused" in line for line in resumed(config))
    assert any("export: reused" in line for line in resumed(config))
    export_config(tmp_path, atol=2e-4)
    assert not any("export: reused" in line for line in resumed(config))


def test_a_fingerprint_holds_the_model_weights_data_and_versions(tmp_path):
    from edgepipe.pipeline.manifest import Manifest
    from edgepipe.pipeline.runner import ModelRun

    config = config_mod.load(export_config(factory_dir(tmp_path)))
    run = ModelRun(config.models[0], config, Manifest(tmp_path / "m", {}), lambda m: None, False)
    fingerprint = run.fingerprint()
    assert fingerprint["weights"].startswith("state ") and fingerprint["data"].startswith("file ")
    assert fingerprint["versions"]["torch"] and fingerprint["versions"]["onnxruntime"]


@pytest.mark.parametrize("top, section, message", [
    ("", '[budgets]\nmax_model_size_mb = "1MB"', "max_model_size_mb = '1MB' is not a number"),
    ('seed = "zero"', "", "seed = 'zero' is not an integer"),
    ("out_dir = 5", "", "out_dir = 5 is not a string"),
    ("", '[export]\natol = "tight"', "atol = 'tight' is not a number"),
    ("", "[quantize]\nbatch_sizes = 32", "batch_sizes = 32 is not a list of integers"),
    ("", '[profile]\nthreads = "2"', "threads = '2' is not an integer (or leave the key out)"),
    ("", "[train]\nepochs = true", "epochs = True is not an integer"),
])
def test_config_values_of_the_wrong_type_are_refused_before_any_work(tmp_path, cli, top, section, message):
    path = tmp_path / "bad.toml"
    path.write_text(f'{top}\nstages = ["train"]\nout_dir = "runs"\n{section}\n[[models]]\nname = "mlp"\n'
                    if "out_dir" not in top else f'{top}\nstages = ["train"]\n{section}\n[[models]]\nname = "mlp"\n')
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_mod.load(path)
    started = time.perf_counter()
    result = cli("run", path)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert time.perf_counter() - started < 5  # refused at load: nothing trained
    assert not (tmp_path / "runs").exists()


def test_a_missing_source_or_data_file_is_a_config_error_relative_to_the_config(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "p.toml"
    path.write_text('stages = ["export"]\n[[models]]\nname = "m"\nsource = "missing.py:build"\n')
    with pytest.raises(ConfigError, match=r"source = 'missing.py:build': file not found \(.*sub/missing.py; "
                                          "paths are relative to the config file"):
        config_mod.load(path)


def test_held_out_data_without_labels_says_it_judges_agreement(tmp_path, capsys):
    from edgepipe.cli._common import load_npz

    np.savez(tmp_path / "held.npz", x=np.zeros((4, 4), np.float32), labels=np.zeros(4))
    inputs, labels = load_npz(tmp_path / "held.npz", ["x"], judges=True)
    assert labels is None and list(inputs) == ["x"]
    assert "has no labels 'y' (it has labels): judging top-1 agreement with FP32" in capsys.readouterr().err
    # calibration rows and parity inputs need no labels: no note for them
    load_npz(tmp_path / "held.npz", ["x"])
    assert "no labels" not in capsys.readouterr().err


def test_an_automatic_split_is_said_and_recorded(tmp_path):
    from edgepipe.models.data import from_npz

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((50, 6)).astype(np.float32), y=rng.integers(0, 3, 50))
    data = from_npz(tmp_path / "d.npz")
    assert "a seeded 80/20 split of its 50 rows" in data.split and data.info()["split"] == data.split


TWO_INPUTS = textwrap.dedent("""
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 64), torch.nn.Linear(4, 64)
            self.head = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                            torch.nn.Linear(64, 3))

        def forward(self, image, extra):
            return self.head(self.a(image) + self.b(extra))

    def build():
        torch.manual_seed(0)
        return Net(), ["image:float32:batch,8", "extra:float32:batch,4"], ["logits"]
""")


def two_input_pipeline(tmp_path: Path, stages: str = '["export", "quantize"]') -> Path:
    (tmp_path / "net.py").write_text(TWO_INPUTS)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "held.npz", image=rng.standard_normal((400, 8)).astype(np.float32),
             extra=rng.standard_normal((400, 4)).astype(np.float32), y=rng.integers(0, 3, 400))
    path = tmp_path / "p.toml"
    path.write_text(textwrap.dedent(f"""
        out_dir = "run"
        stages = {stages}
        [export]
        exporters = ["torchscript"]
        [quantize]
        batch_sizes = [32]
        rounds = 4
        [budgets]
        require_int8 = false
        max_accuracy_drop = 1.0
        [[models]]
        name = "two"
        source = "net.py:build"
        dataset = "held.npz"
    """))
    return path


@pytest.mark.slow
def test_a_multi_input_model_is_judged_on_held_out_data_keyed_by_its_input_names(tmp_path):
    logs: list[str] = []
    result = run_pipeline(config_mod.load(two_input_pipeline(tmp_path)), log=logs.append)
    assert any("a seeded 80/20 split of held.npz's 400 rows" in line for line in logs)
    assert "a seeded 80/20 split" in result.manifest["models"]["two"]["data"]["split"]
    stages = result.manifest["models"]["two"]["stages"]
    assert stages["export"]["status"] == "ok"
    record = stages["quantize"]["record"]
    assert record["judged_on"] == "accuracy against labels on 80 held-out rows"
    assert record["fp32"]["accuracy"] is not None


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_pipeline_killed_mid_quantize_resumes_without_stale_results_or_stray_files(tmp_path, sig):
    config = two_input_pipeline(tmp_path)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = os.environ | {"TMPDIR": str(scratch)}
    # `edgepipe run` whose every candidate build ends with a 3 s pause: this model's whole search
    # takes about 1.5 s after its first candidate is written, and a CI run once finished it before
    # the signal landed; the pause makes "mid-quantize" certain
    slowed = ("import sys, time; from edgepipe.quantize import search; build = search.Search.build; "
              "search.Search.build = lambda self, recipe: (build(self, recipe), time.sleep(3))[0]; "
              "from edgepipe.cli import main; sys.exit(main())")
    proc = subprocess.Popen([sys.executable, "-c", slowed, "run", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for("edgepipe-quant-*/cand0.onnx", scratch)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert "quantize" not in manifest["models"]["two"]["stages"]  # nothing half-done is recorded
    if sig == signal.SIGTERM:
        assert proc.returncode == 128 + sig and manifest["status"] == "interrupted"
        assert f"terminated (signal {int(sig)}): stopping" in err  # a word, not a silent exit
        assert not list(scratch.glob("edgepipe-*"))
    resume = subprocess.run([sys.executable, "-m", "edgepipe", "run", str(config), "--resume"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert resume.returncode == 0, resume.stderr[-2000:]
    assert "export: reused" in resume.stderr and "quantize …" in resume.stderr
    assert not list(scratch.glob("edgepipe-*"))  # the killed run's scratch folder is swept too
    assert not list((tmp_path / "run").rglob("*.tmp"))


TOKENS = textwrap.dedent("""
    import torch

    class Bag(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = torch.nn.Embedding(50, 16), torch.nn.Linear(16, 3)

        def forward(self, ids):
            return self.head(self.embed(ids).mean(1))

    def build():
        torch.manual_seed(0)
        return Bag(), ["ids:int64:batch,seq:0..50"], ["logits"]
""")


@pytest.mark.parametrize("dims, expected", [("{ seq = 12 }", {"seq": 12}), ("{}", {"seq": 16})])
def test_the_pipeline_profiles_at_the_dims_it_is_given_and_records_them(tmp_path, dims, expected):
    (tmp_path / "bag.py").write_text(TOKENS)
    (tmp_path / "p.toml").write_text(textwrap.dedent(f"""
        out_dir = "run"
        stages = ["export", "profile"]
        [export]
        exporters = ["torchscript"]
        [profile]
        batch_sizes = [1, 2]
        rounds = 5
        dims = {dims}
        [[models]]
        name = "bag"
        source = "bag.py:build"
    """))
    result = run_pipeline(config_mod.load(tmp_path / "p.toml"))
    assert result.manifest["models"]["bag"]["stages"]["profile"]["record"]["dims"] == expected


def test_profile_dims_of_the_wrong_type_are_a_config_error(tmp_path):
    (tmp_path / "p.toml").write_text('stages = ["train"]\n[profile]\ndims = { seq = "long" }\n[[models]]\nname = '
                                     '"mlp"\n')
    with pytest.raises(ConfigError, match=r"dims = \{'seq': 'long'\} is not a table of integers"):
        config_mod.load(tmp_path / "p.toml")


@pytest.mark.slow  # runs pipelines
def test_one_run_per_output_folder_and_the_lock_is_released_on_every_exit(tmp_path, cli):
    from edgepipe.artifacts import folder_lock

    config = export_config(factory_dir(tmp_path))
    (tmp_path / "run").mkdir()
    with folder_lock(tmp_path / "run"):  # another run holds it (a second open file: flock refuses it too)
        result = cli("run", config)
        assert result.exit_code == 2, result.output
        assert f"another edgepipe run (PID {os.getpid()}) is writing run directory" in result.output
        assert not (tmp_path / "run" / "manifest.json").exists()  # it wrote nothing
    (tmp_path / "weights.pt").write_bytes(b"broken")  # a run that fails still lets the next one in
    assert cli("run", config).exit_code == 2
    with folder_lock(tmp_path / "run"):
        pass
    factory_dir(tmp_path)
    result = cli("run", config)
    assert result.exit_code == 0, result.output


@pytest.mark.slow  # runs pipelines
def test_resume_into_a_folder_of_another_config_keeps_nothing_of_it(tmp_path):
    config = export_config(factory_dir(tmp_path))
    run_pipeline(config_mod.load(config))
    assert (tmp_path / "run" / "mine" / "model.onnx").exists()
    other = config.read_text().replace('name = "mine"', 'name = "theirs"')
    config.write_text(other)
    logs = resumed(config)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert set(manifest["models"]) == {"theirs"} and manifest["status"] == "passed"
    assert not (tmp_path / "run" / "mine").exists() and any("model 'mine' is not in this config" in m for m in logs)
    assert "mine" not in (tmp_path / "run" / "report.md").read_text()
