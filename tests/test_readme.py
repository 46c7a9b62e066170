"""The README's Python API example runs as written (in a fresh directory, with a config of the
reader's own as the pipeline.toml it loads)."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
DOCS = README.parent / "docs"


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
    (runtime,) = [b for b in python_blocks() if "from edgepipe.runtime import "
                                                "Engine" in b and "provider_options" not in b]
    exec(compile(runtime, str(README), "exec"), {})  # the runtime block, on the model the API block made
    printed = capsys.readouterr().out
    assert "recipe='static" in printed or "recipe='dynamic" in printed  # the typed chosen row
    assert (tmp_path / "runs/mlp/model.int8.onnx").exists() and (tmp_path / "runs/mine/manifest.json").exists()
    assert "mlp" in printed and "export (" in printed  # the run table
    assert "CPUExecutionProvider" in printed and "'x' float32[batch, 1, 8, 8]" in printed  # the runtime block


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


def bash_block(marker: str, page: Path = README) -> str:
    (block,) = [b for b in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S) if marker in b]
    return block


def cli_walkthrough() -> str:
    """The README's CLI walkthrough, then docs/serving.md's serving and Triton blocks, which run
    in its folder."""
    serving = DOCS / "serving.md"
    return "\n".join([bash_block("my_net.py <<"), bash_block("localhost:8000/readyz", serving),
                      bash_block("edgepipe triton ", serving)])


@pytest.mark.slow
@pytest.mark.timeout(900)  # the whole walkthrough: minutes on an AVX2-only CPU
def test_the_cli_walkthrough_runs_as_written_in_an_empty_folder(tmp_path):
    import os
    import subprocess
    import sys

    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", cli_walkthrough()], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    for made in ("runs/mlp/model.int8.onnx", "runs/mlp/pruned.pt", "net.onnx", "dev1.json",
                 "runs/pipeline/manifest.json", "reports/report.html"):
        assert (tmp_path / made).exists(), made
    assert "reused from previous run" in result.stderr  # the --resume line
    assert '{"outputs":{"logits":[[' in result.stdout  # the served model answered the curl
    assert (tmp_path / "model_repository/mlp/config.pbtxt").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)  # fine-tunes, exports and quantizes: minutes on an AVX2-only CPU
def test_the_your_own_data_block_runs_as_written_in_an_empty_folder(tmp_path):
    import os
    import subprocess
    import sys

    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    script = bash_block("--data reviews.csv") + bash_block("--keep-every 2", DOCS / "training.md")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    out = result.stdout + result.stderr
    assert "scores (95% interval): FP32 accuracy" in out and "data: a seeded 80/20 split" in out
    assert "parity ok" in out and "'label': '" in out
    assert (tmp_path / "bert.int8.onnx").exists()
    tuned = json.loads((tmp_path / "my-bert-tuned" / "edgepipe_train.json").read_text())
    assert "fine-tuned my-bert" in out and tuned["eval_accuracy"]["value"] > tuned["eval_accuracy_before"]["value"]
    # docs/training.md, after it: a distilled student, a pruned folder, QAT, each written whole
    student = json.loads((tmp_path / "my-bert-student" / "edgepipe_train.json").read_text())
    assert student["teacher"] and student["params"] < tuned["params"]
    assert (tmp_path / "my-bert-pruned" / "edgepipe_pruned.json").is_file() and "ORT p50 at batch 32" in out
    assert json.loads((tmp_path / "my-bert-qat" / "edgepipe_train.json").read_text())["qat"]
    assert "simulated INT8" in out and (tmp_path / "bert-qat.onnx").is_file()
    assert out.count("scores (95% interval): FP32 accuracy") == 2  # the QAT model judged like the first


@pytest.mark.slow
def test_the_token_classification_block_runs_as_written_in_an_empty_folder(tmp_path):
    import os
    import subprocess
    import sys

    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", bash_block("WordTagger", DOCS / "training.md")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    tuned = json.loads((tmp_path / "my-tagger-tuned" / "edgepipe_train.json").read_text())
    assert tuned["task"] == "token-classification" and tuned["eval_accuracy"]["low"] > 0.9
    assert "(each word judged)" in result.stdout + result.stderr
    import ast

    tagged = [w["tag"] for w in ast.literal_eval(result.stdout.strip().splitlines()[-1])[0]]  # the printed list
    assert tagged == ["B-PER", "O", "B-LOC"]
