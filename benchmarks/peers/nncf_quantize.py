"""NNCF post-training quantization of an ONNX model, as a user of OpenVINO + NNCF would run it.

    PEER_PYTHON benchmarks/peers/nncf_quantize.py FP32.onnx OUT.onnx CALIB.npz

Runs in the peer's own environment (`pip install nncf openvino onnx onnxruntime`), never in
edgepipe's: hf_models.py calls it with --nncf-python. Calibration rows are the .npz arrays
(one per model input), fed one row at a time (NNCF's default subset size caps them at 300).
Prints one JSON line: the seconds it took.
"""

from __future__ import annotations

import json
import sys
import time

import nncf
import numpy as np
import onnx


def main() -> None:
    source, out, calib = sys.argv[1:4]
    data = dict(np.load(calib))
    rows = min(len(v) for v in data.values())
    started = time.perf_counter()
    model = onnx.load(source)
    dataset = nncf.Dataset(range(rows), lambda i: {k: v[i:i + 1] for k, v in data.items()})
    quantized = nncf.quantize(model, dataset, subset_size=rows)
    onnx.save(quantized, out)
    print(json.dumps({"seconds": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
