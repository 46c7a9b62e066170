"""SIGTERM and kill -9: a killed quantize leaves no scratch folder and no traceback, what a
kill -9 left is swept by the next run, and a termination a native library wraps still ends the search."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from run_helpers import wait_for


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
    work = wait_for("edgepipe-quant-*", tmp_path / "tmp")
    assert f"-{proc.pid}-" in work.name
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err
    assert not list((tmp_path / "tmp").glob("edgepipe-*")) and not (tmp_path / "q.onnx").exists()


@pytest.mark.slow
def test_what_a_kill_9_left_is_removed_by_the_next_run(tmp_path):
    from edgepipe.runtime.workdirs import sweep_stale

    proc = _quantize_process(tmp_path)
    work = wait_for("edgepipe-quant-*", tmp_path / "tmp")
    proc.kill()
    proc.communicate(timeout=60)
    assert work.exists()  # SIGKILL: nothing could clean up
    assert sweep_stale(tmp_path / "tmp") == [work] and not work.exists()


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
