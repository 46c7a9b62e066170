"""The README's Python API example runs as written (in a fresh directory, with a config of the
reader's own as the pipeline.toml it loads)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_api_block_is_found():
    (block,) = [b for b in python_blocks() if "run_pipeline(load(" in b]
    assert "quantize(" in block and "int8.report.chosen" in block


@pytest.mark.slow
def test_the_python_api_example_runs_as_written(tmp_path, monkeypatch, capsys):
    (block,) = [b for b in python_blocks() if "run_pipeline(load(" in b]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pipeline.toml").write_text(textwrap.dedent("""
        out_dir = "runs/mine"
        stages = ["train", "export"]
        [train]
        epochs = 2
        [[models]]
        name = "mlp"
    """))
    exec(compile(block, str(README), "exec"), {})
    printed = capsys.readouterr().out
    assert "recipe='static" in printed or "recipe='dynamic" in printed  # the typed chosen row
    assert (tmp_path / "runs/cnn/model.int8.onnx").exists() and (tmp_path / "runs/mine/manifest.json").exists()
    assert "mlp" in printed and "export (" in printed  # the run table
