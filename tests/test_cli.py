"""CLI: one-line errors with exit 2 for bad input, help for every command, real outputs."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest


def test_every_registered_command_is_tested_for_help():
    from edgepipe.cli import COMMANDS, app

    registered = {c.name for c in app.registered_commands}
    assert registered == {name for name, _ in COMMANDS} == set(ALL_COMMANDS)


ALL_COMMANDS = ["train", "prune", "export", "quantize", "compare", "profile", "merge-profiles", "run", "demo",
                "report", "serve", "triton", "generate"]


@pytest.mark.parametrize("command", ALL_COMMANDS)
def test_help_explains_each_command(cli, command):
    from edgepipe.cli import COMMANDS

    doc = dict(COMMANDS)[command].__doc__
    result = cli(command, "--help")
    assert result.exit_code == 0 and "Usage" in result.output and len(result.output) > 300
    assert " ".join(doc.split()[:6]) in " ".join(result.output.split())  # its docstring explains it


@pytest.mark.parametrize("args, message", [
    (["train", "--model", "resnet", "-o", "{tmp}/r"], "unknown model 'resnet'; the zoo has mlp, cnn, lstm, "
            "transformer"),
    (["train", "--model", "cnn", "--dataset", "cifar", "-o", "{tmp}/r"], "unknown dataset 'cifar'"),
    (["train", "--model", "lstm", "--dataset", "digits", "-o", "{tmp}/r"], "takes tokens data"),
    (["train", "--model", "mlp", "--dataset", "{tmp}/nodata.npz", "-o", "{tmp}/r"], "dataset file not found"),
    (["export", "{tmp}/none.pt", "-o", "{tmp}/m.onnx"], "checkpoint not found"),
    (["export", "{tmp}/garbage.pt", "-o", "{tmp}/m.onnx"], "not a loadable edgepipe checkpoint"),
    (["export", "{tmp}/m.py:build", "-o", "{tmp}/m.onnx", "--input", "x:float32"], "cannot parse input spec"),
    (["profile", "{tmp}/garbage.pt"], "cannot load ONNX model"),
    (["profile", "{tmp}/none.onnx"], "ONNX model not found"),
    (["profile", "{onnx}", "--batch", "0,x"], "--batch must be comma-separated integers"),
    (["quantize", "{onnx}", "-o", "{tmp}/q.onnx", "--data", "{tmp}/wrong.npz"], "expected the model's inputs (x) or "
            "'x'"),
    (["run", "{tmp}/none.toml"], "pipeline config not found"),
])
def test_user_errors_exit_2_with_one_line(cli, zoo, tmp_path, args, message):
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a torch file")
    (tmp_path / "m.py").write_text("import torch\ndef build():\n    return torch.nn.Linear(4, 2)\n")
    np.savez(tmp_path / "wrong.npz", images=np.zeros((2, 1, 8, 8), np.float32))
    fmt = {"tmp": tmp_path, "onnx": zoo["mlp"].onnx}
    result = cli(*[a.format(**fmt) for a in args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert result.output.strip().startswith("error:") and result.output.strip().count("\n") == 0
    assert not (tmp_path / "r").exists()  # a rejected command leaves no empty output folder


def test_rejected_arguments_leave_no_folder_and_generate_asks_for_the_exported_file(cli, tmp_path):
    result = cli("train", "--model", "tiny-lm", "--seconds", "-1", "-o", tmp_path / "lm" / "deep")
    assert result.exit_code == 2 and "seconds > 0" in result.output
    assert not (tmp_path / "lm").exists()
    (tmp_path / "kept").mkdir()
    assert cli("train", "--model", "resnet", "-o", tmp_path / "kept").exit_code == 2
    assert (tmp_path / "kept").is_dir()  # a folder that was there stays
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    result = cli("generate", folder, "--prompt", "hi")
    assert result.exit_code == 2 and "is a folder; generate runs an exported decoder file" in result.output
    assert f"edgepipe export {folder} -o model.onnx" in result.output


def test_debug_flag_shows_the_traceback(cli, tmp_path):
    result = cli("--debug", "export", tmp_path / "none.pt", "-o", tmp_path / "m.onnx")
    assert result.exit_code != 0 and result.exception is not None


@pytest.mark.slow  # trains and searches
def test_train_export_quantize_profile_from_the_cli(cli, tmp_path):
    run = tmp_path / "run"
    result = cli("train", "--model", "mlp", "--epochs", "3", "-o", run)
    assert result.exit_code == 0, result.output
    assert "held-out accuracy" in result.output and (run / "checkpoint.pt").exists()

    result = cli("export", run / "checkpoint.pt", "-o", run / "model.onnx", "--json", run / "export.json")
    assert result.exit_code == 0, result.output
    assert "real held-out inputs" in result.output
    assert json.loads((run / "export.json").read_text())["parity"]["ok"]

    from edgepipe.models import load_dataset

    data = load_dataset("digits")
    np.savez(run / "held.npz", x=data.x_test, y=data.y_test)
    result = cli("quantize", run / "model.onnx", "-o", run / "model.int8.onnx", "--data", run / "held.npz",
                 "--batch", "32", "--json", run / "quant.json")
    # The digits MLP at batch 32 is 1.6-1.8x faster in INT8 on AVX2-only CPUs, 2.5x+ with VNNI.
    assert result.exit_code == 0, result.output
    record = json.loads((run / "quant.json").read_text())
    assert "chosen: " in result.output and record["chosen"]["verdict"] == "chosen"
    assert re.search(r"peak memory \d+\.\d MB", result.output)
    assert record["chosen"] in record["candidates"] and (run / "model.int8.onnx").exists()

    result = cli("profile", run / "model.onnx", "--batch", "1,8", "--seconds", "0.05", "--json", run / "p.json")
    assert result.exit_code == 0, result.output
    assert "p99 ms" in result.output and "CPUExecutionProvider" in result.output
    profile = json.loads((run / "p.json").read_text())
    assert "cpu" in profile["hardware"] and profile["hardware"]["cpu"]["features"] is not None
    assert [s["batch"] for s in profile["latency"]] == [1, 8]
