"""Embedding: Engine from a run directory, concurrent calls, the example app without torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from edgepipe.errors import InputError
from edgepipe.pipeline import config as config_mod
from edgepipe.pipeline import run_pipeline
from edgepipe.runtime import Engine

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    (root / "p.toml").write_text(textwrap.dedent("""
        out_dir = "run"
        stages = ["train", "export", "quantize"]
        [train]
        epochs = 3
        [export]
        exporters = ["torchscript"]
        [quantize]
        batch_sizes = [32]
        [budgets]
        min_int8_speedup = 1.0
        [[models]]
        name = "cnn"
    """))
    run_pipeline(config_mod.load(root / "p.toml"))
    return root / "run"


def test_engine_from_run_picks_the_deployed_model(run_dir):
    engine = Engine.from_run(run_dir)  # one model: no name needed
    deployed = engine.run_info["artifact"]
    int8 = (run_dir / "cnn" / "model.int8.onnx").exists()
    assert deployed == ("model.int8.onnx" if int8 else "model.onnx")
    assert Engine.from_run(run_dir, "cnn", precision="fp32").run_info["artifact"] == "model.onnx"
    with pytest.raises(InputError, match="no model 'mlp'"):
        Engine.from_run(run_dir, "mlp")
    with pytest.raises(InputError, match="not an edgepipe run directory"):
        Engine.from_run(run_dir / "cnn")


def test_concurrent_runs_return_each_callers_own_result(run_dir):
    engine = Engine.from_run(run_dir, "cnn")
    rng = np.random.default_rng(0)
    batches = [rng.random((1 + i % 5, 1, 8, 8), dtype=np.float32) for i in range(64)]
    expected = [engine.run(x)["logits"] for x in batches]  # one at a time
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda x: engine.run(x)["logits"], batches))
    for want, have in zip(expected, got):
        np.testing.assert_array_equal(have, want)  # same input -> same bits, never another's


def test_example_app_runs_without_torch(run_dir):
    from run_helpers import BLOCK_HEAVY

    code = BLOCK_HEAVY + textwrap.dedent(f"""
        import runpy, sys
        sys.argv = ["embed_app.py", {str(run_dir)!r}, "cnn"]
        runpy.run_path({str(ROOT / "examples" / "embed_app.py")!r}, run_name="__main__")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "32 images -> classes" in proc.stdout


def test_the_deployment_entry_decides_and_older_manifests_still_open(run_dir, tmp_path):
    import json
    import shutil

    (tmp_path / "cnn").mkdir()
    for name in ("model.onnx", "model.int8.onnx"):  # the FP32 file stands in for both here
        shutil.copy(run_dir / "cnn" / "model.onnx", tmp_path / "cnn" / name)

    def opened(entry: dict, **options) -> str:
        (tmp_path / "manifest.json").write_text(json.dumps({"schema": 3, "models": {"cnn": entry}}))
        return Engine.from_run(tmp_path, "cnn", **options).run_info["artifact"]

    quantized = {"stages": {"quantize": {"status": "ok", "record": {}}}}
    assert opened(quantized | {"deployment": {"precision": "int8", "why": None}}) == "model.int8.onnx"
    kept = quantized | {"deployment": {"precision": "fp32", "why": "INT8 measured 0.8x"}}
    assert opened(kept) == "model.onnx" and opened(kept, precision="int8") == "model.int8.onnx"
    assert opened({"stages": {"quantize": {"status": "not_deployed"}}}) == "model.onnx"  # schema 2
    assert opened(quantized) == "model.int8.onnx"  # schema 2: quantize's status said it
    with pytest.raises(InputError, match="did not write one"):
        opened({"stages": {"quantize": {"status": "refused"}}, "deployment": {"precision": "fp32"}}, precision="int8")
