"""Runs that can be trusted: resume that cannot reuse stale results, config errors before any
work, one-line failures on every path, and the choice the quantize table shows."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from edgepipe.errors import ConfigError, InputError
from edgepipe.pipeline import config as config_mod
from edgepipe.pipeline import run_pipeline

FACTORY = textwrap.dedent("""
    import torch
    from pathlib import Path

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        model.load_state_dict(torch.load(Path(__file__).with_name("weights.pt"), weights_only=True))
        return model, ["x:float32:batch,6"], ["logits"]
""")


def factory_dir(tmp_path: Path) -> Path:
    """A user's model: a factory whose weights live in weights.pt beside it (not in the .py)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    (tmp_path / "model.py").write_text(FACTORY)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.standard_normal((200, 6)).astype(np.float32),
             y=rng.integers(0, 3, 200))
    return tmp_path


def export_config(tmp_path: Path, atol: float = 1e-4) -> Path:
    path = tmp_path / "p.toml"
    path.write_text(textwrap.dedent(f"""
        out_dir = "run"
        stages = ["export"]
        [export]
        exporters = ["torchscript"]
        atol = {atol}
        [[models]]
        name = "mine"
        source = "model.py:build"
        dataset = "data.npz"
    """))
    return path


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


def _file_blocking(tmp_path: Path) -> Path:
    """A path whose folder cannot be created: its parent is a regular file."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    return blocker / "out"


def _tiny_onnx(path: Path, dynamic_seq: bool = False) -> Path:
    if dynamic_seq:
        nodes = [helper.make_node("Cast", ["ids"], ["f"], to=TensorProto.FLOAT),
                 helper.make_node("ReduceSum", ["f"], ["logits"], keepdims=0)]
        inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [])]
    else:
        nodes = [helper.make_node("Relu", ["x"], ["logits"])]
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])]
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    onnx.save(helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


@pytest.mark.parametrize("args", [
    ["quantize", "{onnx}", "-o", "{blocked}/m.int8.onnx"],
    ["profile", "{onnx}", "--json", "{blocked}/p.json", "--seconds", "0.01"],
    ["report", "{onnx}", "--out", "{blocked}"],
    ["train", "--model", "mlp", "-o", "{blocked}"],
    ["export", "{tmp}/model.py:build", "-o", "{blocked}/m.onnx"],
    ["run", "{tmp}/p.toml", "--out", "{blocked}"],
    ["compare", "{onnx}", "{onnx}", "--json", "{blocked}/c.json"],
])
def test_an_output_that_cannot_be_written_is_one_line_before_any_work(tmp_path, cli, args):
    factory_dir(tmp_path)
    export_config(tmp_path)
    fmt = {"onnx": _tiny_onnx(tmp_path / "m.onnx"), "blocked": _file_blocking(tmp_path), "tmp": tmp_path}
    started = time.perf_counter()
    result = cli(*[a.format(**fmt) for a in args])
    assert result.exit_code == 2, result.output
    assert "error: cannot write" in result.output and "Traceback" not in result.output
    assert time.perf_counter() - started < 10  # before quantize searches or train trains


class Output(OrderedDict):
    """What a Hugging Face model returns (ModelOutput is an OrderedDict of its set fields)."""


class DictModel(torch.nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind, self.fc = kind, torch.nn.Linear(4, 3)

    def forward(self, x):
        logits, hidden = self.fc(x), torch.relu(x)
        if self.kind == "dict":
            return {"logits": logits, "hidden": hidden, "aux": None}
        if self.kind == "model_output":
            return Output(logits=logits, hidden=hidden)
        return logits, hidden


@pytest.mark.parametrize("kind, names", [("dict", ["logits", "hidden"]), ("model_output", ["logits", "hidden"]),
                                         ("tuple", ["output_0", "output_1"])])
def test_models_returning_dicts_model_outputs_or_tuples_export_with_named_outputs(tmp_path, kind, names):
    from edgepipe.exporters import ExportConfig, export
    from edgepipe.runtime import Engine

    torch.manual_seed(0)
    model = DictModel(kind)
    result = export(model, tmp_path / "m.onnx", ExportConfig(), inputs=["x:float32:batch,4"])
    assert result.report.outputs == names and result.report.parity["ok"]
    assert result.report.exporter == "dynamo"  # the wrapper keeps the dynamo exporter usable
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    got = Engine(tmp_path / "m.onnx").run(x)
    np.testing.assert_allclose(got[names[0]], model.fc(torch.from_numpy(x)).detach().numpy(), atol=1e-5)


@pytest.mark.parametrize("args, message", [
    (["report", "{bad_onnx}"], "is not JSON"),
    (["export", "{tmp}/model.py", "-o", "{tmp}/o.onnx"], "is Python source: name the function that builds the model"),
    (["quantize", "{onnx}", "-o", "{tmp}/q.onnx", "--data", "{bad_onnx}"], "is not an .npz archive"),
    (["compare", "{onnx}", "{onnx}", "--batch", "0"], "batch must be at least 1 row"),
    (["compare", "{onnx}", "{onnx}", "--data", "{empty}"], "no rows to compare"),
    (["profile", "{seq_onnx}", "--dim", "length=8", "--seconds", "0.01"], "no dynamic dim named length"),
    (["profile", "{seq_onnx}", "--dim", "seq=0"], "must be NAME=SIZE with a positive size"),
    (["serve", "{onnx}", "--max-batch", "0"], "max batch must be >= 1, got 0"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, cli, args, message):
    (tmp_path / "model.py").write_text(FACTORY)
    bad = tmp_path / "trunc.onnx"
    bad.write_bytes(_tiny_onnx(tmp_path / "m.onnx").read_bytes()[:40])
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 4), np.float32))
    fmt = {"tmp": tmp_path, "onnx": tmp_path / "m.onnx", "bad_onnx": bad, "empty": tmp_path / "empty.npz",
           "seq_onnx": _tiny_onnx(tmp_path / "seq.onnx", dynamic_seq=True)}
    result = cli(*[a.format(**fmt) for a in args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_profile_prints_and_records_the_size_of_every_dynamic_dim(tmp_path, cli):
    model = _tiny_onnx(tmp_path / "seq.onnx", dynamic_seq=True)
    result = cli("profile", model, "--batch", "1", "--seconds", "0.01", "--json", tmp_path / "p.json")
    assert result.exit_code == 0 and "dynamic dims: seq=16 (the export's example sizes" in result.output
    result = cli("profile", model, "--batch", "1", "--seconds", "0.01", "--dim", "seq=128", "--json", tmp_path / "p.json")
    assert result.exit_code == 0 and "dynamic dims: seq=128" in result.output
    assert json.loads((tmp_path / "p.json").read_text())["dims"] == {"seq": 128}


def test_profile_compare_labels_files_that_share_a_name_by_their_path(tmp_path, cli):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first, second = _tiny_onnx(tmp_path / "a" / "m.onnx"), _tiny_onnx(tmp_path / "b" / "m.onnx")
    result = cli("profile", first, "--compare", second, "--batch", "1", "--seconds", "0.01")
    assert result.exit_code == 0, result.output
    rows = [line.split()[0] for line in result.output.splitlines() if "m.onnx" in line]
    assert rows == ["a/m.onnx", "b/m.onnx"]  # the shortest tail of the paths that tells them apart
    result = cli("profile", first, "--compare", first, "--batch", "1", "--seconds", "0.01")
    assert result.exit_code == 2 and "the same model on the same backend twice" in result.output


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


def test_a_port_in_use_is_one_line_before_loading_the_model(tmp_path, cli):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli("serve", _tiny_onnx(tmp_path / "m.onnx"), "--port", port)
    assert result.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in result.output
    assert "serving" not in result.output


def test_the_choice_is_the_fastest_by_the_figures_the_table_shows():
    from edgepipe.quantize.recipes import Recipe
    from edgepipe.quantize.search import Candidate
    from edgepipe.quantize.stage import choose
    from edgepipe.quantize.verdict import OK, Verdict

    cands = [Candidate(Recipe("dynamic", weight_type=k), speedup={32: v}, verdict=Verdict(OK))
             for k, v in {"a": 2.0, "b": 1.9, "c": 1.4}.items()]  # a's first trial flattered it
    chosen = choose(Trials({"a": 1.50, "b": 1.70, "c": 1.30}), cands)
    assert chosen.recipe.weight_type == "b"
    shown = {c.recipe.weight_type: c.speedup[32] for c in cands}
    assert all(v <= shown["b"] for v in shown.values())  # no row shows a faster accepted candidate
    assert str(cands[2].verdict).startswith("ok in one trial, not re-timed")


class Trials:
    """A stand-in Search: confirm() re-times a candidate, its median replacing the first trial."""

    def __init__(self, medians):
        from edgepipe.quantize.config import QuantizeConfig

        self.medians, self.config, self.choice = medians, QuantizeConfig(), None

    def confirm(self, cand, trials=2):
        cand.speedup = {32: self.medians[cand.recipe.weight_type]}
        return True

    def out_of_time(self, fraction=1.0):
        return False


def test_among_candidates_as_fast_within_the_noise_the_most_faithful_wins():
    from edgepipe.quantize.recipes import Recipe
    from edgepipe.quantize.search import Candidate
    from edgepipe.quantize.stage import choose
    from edgepipe.quantize.verdict import OK, Verdict

    def cand(key, first, rel_l2):
        return Candidate(Recipe("dynamic", weight_type=key), speedup={32: first}, verdict=Verdict(OK),
                         fidelity={"rel_l2": rel_l2, "cosine": 1.0})

    # a is fastest; b is 3% slower (inside the 5% band) and 5x more faithful; c is more faithful
    # still but 12% slower: outside the band, it is not even re-timed.
    cands = [cand("a", 1.70, 0.05), cand("b", 1.65, 0.01), cand("c", 1.50, 0.001)]
    search = Trials({"a": 1.70, "b": 1.65, "c": 1.50})
    chosen = choose(search, cands)
    assert chosen.recipe.weight_type == "b"
    assert "more faithful to FP32 (relative L2 0.01 vs 0.05)" in search.choice
    assert str(cands[2].verdict).startswith("ok in one trial, not re-timed")

    cands = [cand("a", 1.70, 0.05), cand("b", 1.60, 0.01)]  # b 6% slower: speed decides
    assert choose(Trials({"a": 1.70, "b": 1.60}), cands).recipe.weight_type == "a"


def _wait_for(pattern: str, root: Path, deadline_s: float = 60) -> Path:
    deadline = time.time() + deadline_s
    while time.time() < deadline:
        found = list(root.glob(pattern))
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"{pattern} never appeared under {root}")


def _quantize_process(tmp_path: Path) -> subprocess.Popen:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10))
    from edgepipe.exporters import ExportConfig, export

    export(model, tmp_path / "m.onnx", ExportConfig(exporters=("torchscript",)), inputs=["x:float32:batch,256"])
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = os.environ | {"TMPDIR": str(scratch)}
    return subprocess.Popen([sys.executable, "-m", "edgepipe", "quantize", str(tmp_path / "m.onnx"), "-o",
                             str(tmp_path / "q.onnx")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.mark.slow
def test_sigterm_mid_quantize_leaves_no_scratch_folder_and_no_traceback(tmp_path):
    proc = _quantize_process(tmp_path)
    work = _wait_for("edgepipe-quant-*", tmp_path / "tmp")
    assert f"-{proc.pid}-" in work.name
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err
    assert not list((tmp_path / "tmp").glob("edgepipe-*")) and not (tmp_path / "q.onnx").exists()


@pytest.mark.slow
def test_what_a_kill_9_left_is_removed_by_the_next_run(tmp_path):
    from edgepipe.runtime.workdirs import sweep_stale

    proc = _quantize_process(tmp_path)
    work = _wait_for("edgepipe-quant-*", tmp_path / "tmp")
    proc.kill()
    proc.communicate(timeout=60)
    assert work.exists()  # SIGKILL: nothing could clean up
    assert sweep_stale(tmp_path / "tmp") == [work] and not work.exists()


def test_openapi_documents_predict_and_metrics_get_is_405_and_a_misnamed_input_is_named(tmp_path):
    import httpx
    from test_serve import LoopbackServer

    from edgepipe.runtime import Engine
    from edgepipe.serve.app import create_app

    with LoopbackServer(create_app(Engine(_tiny_onnx(tmp_path / "m.onnx")))) as server:
        spec = httpx.get(server.url + "/openapi.json").json()
        post = spec["paths"]["/v1/predict"]["post"]
        assert set(post["requestBody"]["content"]) == {"application/json", "application/x-npy"}
        assert "inputs" in post["requestBody"]["content"]["application/json"]["schema"]["properties"]
        assert "text/plain" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
        assert httpx.get(server.url + "/v1/predict").status_code == 405
        wrong = httpx.post(server.url + "/v1/predict", json={"inputs": {"image": [[1.0, 2.0, 3.0, 4.0]]}})
        assert wrong.status_code == 422 and "unknown input(s) 'image'" in wrong.json()["error"]
        assert "missing input 'x'" in wrong.json()["error"]
        right = httpx.post(server.url + "/v1/predict", json={"inputs": {"x": [[-1.0, 2.0, 3.0, 4.0]]}})
        assert right.status_code == 200 and right.json()["outputs"]["logits"] == [[0.0, 2.0, 3.0, 4.0]]


def test_a_provider_error_suggests_only_options_that_exist(tmp_path):
    from edgepipe.runtime import Engine

    with pytest.raises(InputError) as err:
        Engine(_tiny_onnx(tmp_path / "m.onnx"), providers=["cuda", "cpu"])
    assert "--allow-fallback" not in str(err.value) and "--provider cpu" in str(err.value)


def test_an_exporter_error_is_shown_by_its_error_line_not_its_log():
    from edgepipe.exporters.failures import error_line

    log = "\n".join(["[torch.onnx] Obtain model graph ...", "  line of log"] * 20
                    + ["torch._dynamo.exc.Unsupported: data-dependent branching", "", "Next steps:"])
    assert error_line(RuntimeError(log)) == "torch._dynamo.exc.Unsupported: data-dependent branching"
    assert error_line(RuntimeError("Next steps:")) == "Next steps:"
    torch_onnx = ("Failed to export the model with torch.export. \x1b[96mThis is step 1/3\x1b[0m. Next steps:\n"
                  "- Modify the model code for `torch.export.export` to succeed.\n\n## Exception summary\n\n"
                  "<class 'torch.fx.experimental.symbolic_shapes.GuardOnDataDependentSymNode'>: Could not guard\n"
                  "The following call raised this error:\n  File \"m.py\", line 6, in forward\n    if x.sum() > 0:\n")
    assert error_line(RuntimeError(torch_onnx)) == ("GuardOnDataDependentSymNode: Could not guard "
                                                     "[File \"m.py\", line 6, in forward if x.sum() > 0:]")
    assert error_line(ValueError("")) == "ValueError"


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
    _wait_for("edgepipe-quant-*/cand0.onnx", scratch)
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


def test_a_sigterm_a_native_library_turns_into_its_own_error_still_ends_the_search(tmp_path):
    """A CI run finished a whole quantize search after its SIGTERM: the signal landed inside a
    native call that turned the handler's SystemExit into a RuntimeError, and the search recorded
    a failed candidate and went on. The request is remembered and re-raised."""
    from edgepipe import interrupts
    from edgepipe.cli import _terminate
    from edgepipe.quantize import QuantizeConfig
    from edgepipe.quantize.config import EvalData
    from edgepipe.quantize.recipes import Recipe
    from edgepipe.quantize.search import Search

    weight = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [onnx.numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    src = tmp_path / "mm.onnx"
    onnx.save(model, str(src))
    data = EvalData({"x": np.random.default_rng(1).standard_normal((16, 16)).astype(np.float32)})
    search = Search(src, QuantizeConfig(batch_sizes=(8,), time_budget_s=0, backends=("onnxruntime",)),
                    data, data, tmp_path, lambda message: None)
    search.sources = [src]

    def native(path, **options):  # a library that checks for signals and wraps what they raise
        try:
            _terminate(signal.SIGTERM, None)
        except SystemExit as exc:
            raise RuntimeError(f"python callback failed: {exc!r}") from None

    search.engine = native
    try:
        with pytest.raises(SystemExit) as ended:
            search.build(Recipe("dynamic", weight_type="S8"))
        assert ended.value.code == 128 + signal.SIGTERM
    finally:
        interrupts.clear()
    # without a termination request the same error is a failed candidate, as before
    search.engine = lambda path, **options: (_ for _ in ()).throw(RuntimeError("no kernel"))
    failed = search.build(Recipe("dynamic", weight_type="S8", per_channel=True))
    assert failed.error == "RuntimeError: no kernel"


def test_onnxruntime_warnings_meant_for_its_developers_stay_quiet(tmp_path, caplog, monkeypatch):
    import logging

    from edgepipe.quantize import builders
    from edgepipe.quantize.recipes import Recipe

    def chatty(recipe, model_path, out, calibration, samples):
        logging.getLogger("onnxruntime.tools.symbolic_shape_infer").warning(
            "unsupported broadcast between Min(512, seq) seq")
        out.write_bytes(b"")

    monkeypatch.setitem(builders.BUILDERS, "dynamic", chatty)
    builders.build(Recipe("dynamic"), tmp_path / "in.onnx", tmp_path / "out.onnx", None, 0)
    logging.getLogger("edgepipe.test").warning("still shown")  # logging is restored afterwards
    messages = [r.getMessage() for r in caplog.records]
    assert "still shown" in messages and not any("unsupported broadcast" in m for m in messages)


DATA_DEPENDENT = textwrap.dedent("""
    import torch

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            if x.sum() > 0:  # a branch on the data: dynamo cannot export it, TorchScript bakes one side
                return self.fc(x)
            return self.fc(-x)

    def build():
        return M(), ["x:float32:batch,4"]
""")


def test_a_failed_export_is_one_line_naming_the_cause_and_the_model_code(tmp_path):
    (tmp_path / "dd.py").write_text(DATA_DEPENDENT)
    result = subprocess.run([sys.executable, "-m", "edgepipe", "export", f"{tmp_path}/dd.py:build", "-o",
                             str(tmp_path / "dd.onnx")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1  # torchscript exported it, but parity caught the baked branch
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines  # no torch log lines around it
    assert "GuardOnDataDependentSymNode" in lines[0] and "line 10, in forward" in lines[0]
    assert "parity violated" in lines[0] and not (tmp_path / "dd.onnx").exists()


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
    (tmp_path / "p.toml").write_text('stages = ["train"]\n[profile]\ndims = { seq = "long" }\n[[models]]\nname = "mlp"\n')
    with pytest.raises(ConfigError, match=r"dims = \{'seq': 'long'\} is not a table of integers"):
        config_mod.load(tmp_path / "p.toml")


def test_peak_memory_is_measured_per_piece_of_work():
    """In a fresh process: a long test session's heap may hand freed pages back to the next
    allocation without raising the resident set, which no measurement can see."""
    import subprocess
    import sys

    code = ("import json, numpy as np\n"
            "from edgepipe.memory import PeakMemory\n"
            "with PeakMemory() as big:\n"
            "    block = np.ones(40_000_000)  # 320 MB, touched\n"
            "    del block\n"
            "with PeakMemory() as small:\n"
            "    np.ones(1000).sum()\n"
            "print(json.dumps([big.to_dict(), small.to_dict()]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    big, small = json.loads(out.strip().splitlines()[-1])
    assert big["peak_rss_mb"] is not None and small["peak_rss_mb"] is not None
    if big["peak_rss_scope"] == "work":  # Linux: the high-water mark was reset before each
        assert big["peak_rss_mb"] - small["peak_rss_mb"] > 250, (big, small)
    else:
        assert big["peak_rss_mb"] >= small["peak_rss_mb"]


def test_peak_memory_nests_phases_inside_a_stage():
    """A phase resets the high-water mark too; the stage around it must still see the phase's
    peak (a search's peak is its largest phase's), and each phase its own."""
    import subprocess
    import sys

    code = ("import json, numpy as np\n"
            "from edgepipe.memory import PeakMemory\n"
            "with PeakMemory() as stage:\n"
            "    with PeakMemory() as heavy:\n"
            "        block = np.ones(40_000_000)  # 320 MB, touched\n"
            "        del block\n"
            "    with PeakMemory() as light:\n"
            "        np.ones(1000).sum()\n"
            "print(json.dumps([stage.to_dict(), heavy.to_dict(), light.to_dict()]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    stage, heavy, light = json.loads(out.strip().splitlines()[-1])
    if heavy["peak_rss_scope"] != "work":
        pytest.skip("no resettable high-water mark on this OS")
    assert heavy["peak_rss_mb"] - light["peak_rss_mb"] > 250, (heavy, light)
    assert stage["peak_rss_mb"] >= heavy["peak_rss_mb"], (stage, heavy)


def test_an_accuracy_budget_the_rows_cannot_resolve_is_judged_by_its_confidence_bound():
    from types import SimpleNamespace

    from edgepipe.quantize.config import QuantizeConfig
    from edgepipe.quantize.evaluation import Flips, flips, resolves
    from edgepipe.quantize.search import Candidate, Search

    assert not resolves(32, 0.01) and resolves(360, 0.01)  # one row: 3.1 points vs 0.28 points
    one = Flips(losses=1, gains=0, rows=32)
    assert one.drop == pytest.approx(1 / 32)
    # the bound is the lower end of the drop's 95% interval, which straddles a 1-point budget
    assert one.drop_lower_bound == one.interval.low < 0.01 < one.interval.high

    def accurate(f: Flips, rows_resolve: bool) -> bool:
        search = SimpleNamespace(config=QuantizeConfig(max_accuracy_drop=0.01), resolved=rows_resolve)
        return Search.accurate(search, Candidate(None, accuracy_drop=f.drop, flips=f))

    assert accurate(one, rows_resolve=False)  # one flip of 32 is noise, not a 3-point loss
    assert not accurate(one, rows_resolve=True)  # with enough rows, the measured drop decides
    assert not accurate(Flips(5, 0, 32), rows_resolve=False)  # 5 of 32 is a real loss
    assert accurate(Flips(5, 4, 360), rows_resolve=True)  # net 1 row of 360

    labels = np.array([0, 1, 1, 0])
    fp32 = np.eye(2)[[0, 1, 0, 0]]  # right, right, wrong, right
    mine = np.eye(2)[[0, 0, 1, 0]]  # right, wrong, right, right
    assert flips(mine, fp32, labels) == Flips(losses=1, gains=1, rows=4)
    assert flips(mine, fp32, None) == Flips(losses=2, gains=0, rows=4)  # no labels: changed top-1


def test_screening_drops_clearly_slower_candidates_before_the_full_timing():
    from edgepipe.quantize.config import QuantizeConfig
    from edgepipe.quantize.recipes import Recipe
    from edgepipe.quantize.search import Candidate, Search

    search = Search.__new__(Search)  # the judging logic alone, with timing stood in for
    search.config, search.say, search.timers = QuantizeConfig(rounds=12, time_budget_s=0), lambda message: None, {1: "sessions"}
    search.rounds_used, search.settings = {}, ["one setting"]
    search.candidates = [Candidate(Recipe("dynamic", weight_type=k), accuracy_drop=0.0) for k in "abc"]
    speeds, calls = {0: 1.5, 1: 0.5, 2: 0.9}, []

    def measure(indices, rounds=None):
        calls.append((list(indices), rounds))
        for i in indices:
            search.candidates[i].speedup = {32: speeds[i]}

    search.measure = measure
    assert search.screen([0, 1, 2]) == [0, 2]  # 0.9x may still clear 1.05x in a full timing; 0.5x cannot
    assert calls == [([0, 1, 2], 3)]
    slow = search.candidates[1]
    assert slow.screened and str(slow.verdict).endswith("at batch 32 (0.50x) in the screening pass")
    assert 1 not in search.timers  # its timing sessions (and their memory) released
    assert search.screen([2]) == [2] and len(calls) == 1  # one candidate: nothing to screen


def test_channel_noise_accumulated_over_chunks_equals_one_pass_over_all_rows():
    """The fallback's node ranking runs instrumented models a chunk of rows at a time (BERT-base
    with all 64 probe rows at once needed over 24 GB): the figure must not change."""
    from edgepipe.instrument import ChannelNoise, channel_nsr

    rng = np.random.default_rng(0)
    for shape in ((64, 16, 5, 5), (64, 12, 32)):
        reference = rng.standard_normal(shape).astype(np.float32)
        reference[:, 3] *= 50  # an outlier channel must not hide the rest
        actual = reference + rng.standard_normal(shape).astype(np.float32) * 0.05
        chunked = ChannelNoise()
        for start in range(0, 64, 8):
            chunked.add(reference[start:start + 8], actual[start:start + 8])
        assert chunked.nsr() == pytest.approx(channel_nsr(reference, actual), rel=1e-9)
        assert chunked.nsr() > 1e-6  # real noise, measured
    assert ChannelNoise().add(np.zeros((2, 3)), np.zeros((2, 4))).nsr() == 1.0  # shapes differ: all noise


def _counted(counts: dict, name: str, seconds: float):
    """A stand-in model call that takes `seconds` and counts itself in `counts[name]`."""
    def run():
        counts[name] += 1
        time.sleep(seconds)
    return run


def test_interleaved_timing_scales_warmup_and_calls_per_block_with_the_cost_of_a_call():
    """A 0.1 ms model keeps the full counts; a 150 ms one (ResNet-50 at batch 8 on 2 cores costs
    twice that) gets 3 warm-up calls and one call per block: ten candidates timed in minutes."""
    from edgepipe.runtime.timing import measure_interleaved

    counts = {"cheap": 0, "slow": 0}

    stats = measure_interleaved({"cheap": _counted(counts, "cheap", 0.0001), "slow": _counted(counts, "slow", 0.15)}, 1,
                                warmup=10, rounds=3, calls_per_round=10)
    assert stats["cheap"].iterations == 30 and counts["cheap"] == 30 + 10
    assert stats["slow"].iterations == 3 and counts["slow"] == 3 + 3
    assert stats["slow"].p50_ms > 100 * stats["cheap"].p50_ms


def test_one_first_call_of_half_a_second_or_more_is_the_whole_warm_up():
    """A call past WARMUP_S has set its session up on its own; a second warm-up call would cost
    ViT-base 1.7 s per model per trial at batch 8. Below it, a second (warm) call is timed for
    the cost, and more follow up to WARMUP_S."""
    from edgepipe.runtime.timing import WARMUP_S, measure_interleaved

    counts = {"heavy": 0, "medium": 0}

    stats = measure_interleaved({"heavy": _counted(counts, "heavy", WARMUP_S + 0.05),
                                 "medium": _counted(counts, "medium", WARMUP_S * 0.6)}, 8, rounds=3)
    assert counts["heavy"] == 1 + 3 and stats["heavy"].iterations == 3
    assert counts["medium"] == 2 + 3 and stats["medium"].iterations == 3


def test_a_large_models_candidates_are_timed_one_at_a_time_against_their_own_fp32_run(tmp_path, monkeypatch):
    """Above PAIRWISE_BYTES every candidate is timed with FP32 alone (each live session holds its
    weights and an arena), judged against that FP32 run, and released."""
    from edgepipe.quantize import search as search_mod
    from edgepipe.quantize.config import QuantizeConfig
    from edgepipe.quantize.recipes import Recipe
    from edgepipe.quantize.search import Candidate, Search
    from edgepipe.runtime.sessions import SessionSetting

    setting = SessionSetting(2, False)
    search = Search.__new__(Search)
    search.config, search.settings = QuantizeConfig(batch_sizes=(8,), time_budget_s=0), [setting]
    search.sweep, search.rounds_used = {8: [setting]}, {}
    search.onnx_path = tmp_path / "big.onnx"
    search.onnx_path.write_bytes(b"0" * 64)
    search.candidates = [Candidate(Recipe("dynamic", weight_type=k)) for k in "ab"]
    for k, cand in zip("ab", search.candidates):
        cand.path = tmp_path / f"{k}.onnx"
        cand.path.write_bytes(b"0" * 16)
    search.timers = {0: "sessions", 1: "sessions", "fp32": "sessions"}
    fp32_runs = iter([10.0, 12.0])  # FP32 drifts between the two groups
    groups = []

    def measure_group(indices, rounds):
        groups.append(list(indices))
        return {"fp32": {8: {setting: next(fp32_runs)}}, **{i: {8: {setting: 5.0}} for i in indices}}

    search.measure_group = measure_group
    monkeypatch.setattr(search_mod, "PAIRWISE_BYTES", 10)
    search.measure([0, 1])
    assert groups == [[0], [1]]
    assert search.candidates[0].speedup == {8: 2.0} and search.candidates[1].speedup == {8: 2.4}
    assert search.fp32_p50 == {8: 11.0} and set(search.timers) == {"fp32"}

    monkeypatch.setattr(search_mod, "PAIRWISE_BYTES", 1 << 30)  # a small model: all at once
    groups.clear()
    fp32_runs = iter([10.0])
    search.measure([0, 1])
    assert groups == [[0, 1]]

    # the weights held count once per session setting: 96 bytes fit under 100 with one
    # setting; with two (a 16-core machine sweeps 1 and 16 threads) they are timed apart
    monkeypatch.setattr(search_mod, "PAIRWISE_BYTES", 100)
    assert not search.timed_apart([0, 1])
    search.settings = [SessionSetting(1, False), setting]
    assert search.timed_apart([0, 1]) and not search.timed_apart([0])


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


def test_an_exporters_io_error_is_an_error_and_a_fallback_names_its_reason(tmp_path, monkeypatch):
    from edgepipe.exporters import onnx_export
    from edgepipe.exporters.onnx_export import ExportConfig, export
    from edgepipe.pipeline.report import _export_label

    model = torch.nn.Sequential(torch.nn.Linear(6, 3))
    config = ExportConfig(exporters=("dynamo", "torchscript"))

    def vanished(source, example, path, opset):  # the staging folder removed under the exporter
        raise FileNotFoundError(2, "No such file or directory", str(path))

    monkeypatch.setattr(onnx_export, "_dynamo_export", vanished)
    with pytest.raises(InputError, match="export could not write .*model.onnx: No such file or directory"):
        export(model, tmp_path / "model.onnx", config, inputs=["x:float32:batch,6"])

    def unsupported(source, example, path, opset):
        raise RuntimeError("torch._dynamo.exc.Unsupported: data-dependent branching")

    monkeypatch.setattr(onnx_export, "_dynamo_export", unsupported)
    report = export(model, tmp_path / "model.onnx", config, inputs=["x:float32:batch,6"]).report
    assert report.exporter == "torchscript"
    label = _export_label(report)
    assert label.startswith("export (torchscript; dynamo failed: RuntimeError: torch._dynamo.exc.Unsupported")
    assert _export_label(export(model, tmp_path / "ts.onnx", ExportConfig(exporters=("torchscript",)),
                                inputs=["x:float32:batch,6"]).report) == "export (torchscript)"
