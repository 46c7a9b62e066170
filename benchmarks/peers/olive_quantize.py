"""Olive's INT8 quantization of an ONNX model, as a user of olive-ai would run it.

    PEER_PYTHON benchmarks/peers/olive_quantize.py FP32.onnx OUT_DIR dynamic|static [CALIB.npz]

Runs in the peer's own environment (`pip install olive-ai onnxruntime`, and torch, which Olive
imports), never in edgepipe's: hf_models.py calls it with --olive-python. One Olive workflow
with one pass on the CPU execution provider: OnnxDynamicQuantization, or OnnxStaticQuantization
with its default settings, calibrated on the .npz rows (the same rows NNCF gets), one row per
call. Olive's telemetry is switched off (nothing can be reached here anyway). Prints one JSON
line: the seconds it took and the model it wrote.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

STARTED = time.perf_counter()  # Olive's imports count: a user waits for them too
os.environ.setdefault("OLIVE_DISABLE_TELEMETRY", "1")

from olive.data.registry import Registry  # noqa: E402


class NpzRows:
    """The calibration rows as Olive's dataloader expects them: (inputs, label) per item."""

    def __init__(self, path: str):
        import numpy as np

        self.data = dict(np.load(path))
        self.rows = min(len(v) for v in self.data.values())

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, i: int):
        return {k: v[i] for k, v in self.data.items()}, 0


@Registry.register_dataset()
def npz_rows(data_path: str):
    return NpzRows(data_path)


def main() -> None:
    source, out, mode = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve(), sys.argv[3]
    from olive import run

    config: dict = {
        "input_model": {"type": "ONNXModel", "model_path": str(source)},
        "systems": {"local": {"type": "LocalSystem", "accelerators": [
            {"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}]}},
        "host": "local", "target": "local", "output_dir": str(out), "log_severity_level": 3,
        "cache_dir": tempfile.mkdtemp(prefix="olive-cache-"),
    }
    if mode == "dynamic":
        config["passes"] = {"quantize": {"type": "OnnxDynamicQuantization"}}
    else:
        config["data_configs"] = [{
            "name": "calibration", "user_script": str(Path(__file__).resolve()),
            "load_dataset_config": {"type": "npz_rows", "data_path": str(Path(sys.argv[4]).resolve())},
            "dataloader_config": {"batch_size": 1}}]
        config["passes"] = {"quantize": {"type": "OnnxStaticQuantization", "data_config": "calibration"}}
    run(config)
    written = sorted(out.rglob("*.onnx"), key=lambda p: p.stat().st_mtime)
    if not written:
        sys.exit(f"Olive wrote no ONNX model under {out}")
    print(json.dumps({"seconds": round(time.perf_counter() - STARTED, 1), "model": str(written[-1])}))


if __name__ == "__main__":
    main()
