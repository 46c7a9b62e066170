"""The runtime must install and run on a device with only numpy + onnxruntime."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from run_helpers import BLOCK_HEAVY


# A meta-path hook that makes torch / onnx tooling unimportable, as on an edge device.
def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_import_runtime_pulls_in_no_torch_or_onnx():
    proc = run_python("import sys, edgepipe.runtime; "
                      "print(sorted(m for m in ('torch', 'onnx', 'onnxscript') if m in sys.modules))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_cli_profile_runs_with_torch_and_onnx_unimportable(zoo, tmp_path):
    out = tmp_path / "profile.json"
    code = BLOCK_HEAVY + textwrap.dedent(f"""
        import sys
        sys.argv = ["edgepipe", "profile", {str(zoo["mlp"].onnx)!r}, "--batch", "1,4",
                    "--seconds", "0.05", "--json", {str(out)!r}]
        from edgepipe.cli import main
        try:
            main()
        except SystemExit as exc:
            sys.exit(exc.code)
    """)
    proc = run_python(code)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads(out.read_text())
    assert [s["batch"] for s in record["latency"]] == [1, 4]
    assert record["hardware"]["onnxruntime"]


def test_engine_runs_with_torch_unimportable(zoo):
    code = BLOCK_HEAVY + textwrap.dedent(f"""
        import numpy as np
        from edgepipe.runtime import Engine
        engine = Engine({str(zoo["cnn"].onnx)!r})
        out = engine.run(np.zeros((3, 1, 8, 8), np.float32))
        print(out["logits"].shape)
    """)
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "(3, 10)"
