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


def test_the_readme_pipeline_is_the_example_file():
    text = README.read_text()
    (block,) = re.findall(r"```toml\n(.*?)```", text, flags=re.S)
    assert block == (README.parent / "examples" / "pipeline.toml").read_text()


@pytest.mark.slow
def test_the_example_pipeline_passes_as_written_from_another_directory(tmp_path, monkeypatch, cli):
    monkeypatch.chdir(tmp_path)
    result = cli("run", README.parent / "examples" / "pipeline.toml", "--out", tmp_path / "mine")
    assert result.exit_code == 0, result.output[-2500:]
    assert "all gates passed" in result.output
    for row in ("cnn ", "text ", "export (", "quantize ("):
        assert row in result.output
