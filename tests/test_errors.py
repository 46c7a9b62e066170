"""One-line failures on every path: outputs that cannot be written, bad input, ports in use,
provider and exporter errors, and the libraries' developer warnings kept quiet."""

from __future__ import annotations

import json
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
from run_helpers import FACTORY, export_config, factory_dir

from edgepipe.errors import InputError


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
    result = cli("profile", model, "--batch", "1", "--seconds", "0.01", "--dim", "seq=128", "--json",
                 tmp_path / "p.json")
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


def test_a_port_in_use_is_one_line_before_loading_the_model(tmp_path, cli):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli("serve", _tiny_onnx(tmp_path / "m.onnx"), "--port", port)
    assert result.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in result.output
    assert "serving" not in result.output


def test_openapi_documents_predict_and_metrics_get_is_405_and_a_misnamed_input_is_named(tmp_path):
    import httpx
    from loopback import LoopbackServer

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


@pytest.mark.slow  # two exporters tried and a parity check in a fresh process
def test_a_failed_export_is_one_line_naming_the_cause_and_the_model_code(tmp_path):
    (tmp_path / "dd.py").write_text(DATA_DEPENDENT)
    result = subprocess.run([sys.executable, "-m", "edgepipe", "export", f"{tmp_path}/dd.py:build", "-o",
                             str(tmp_path / "dd.onnx")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1  # torchscript exported it, but parity caught the baked branch
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines  # no torch log lines around it
    assert "GuardOnDataDependentSymNode" in lines[0] and "line 10, in forward" in lines[0]
    assert "parity violated" in lines[0] and not (tmp_path / "dd.onnx").exists()


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
