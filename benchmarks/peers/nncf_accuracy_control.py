"""NNCF's accuracy-controlled post-training quantization of an ONNX classifier, as a user of
OpenVINO + NNCF would run it: quantize everything, then return layers to FP32, most harmful
first, until the accuracy on the validation rows is within `max_drop` of FP32's.

    PEER_PYTHON benchmarks/peers/nncf_accuracy_control.py FP32.onnx OUT.onnx CALIB.npz EVAL.npz [MAX_DROP]

Runs in the peer's own environment (`pip install nncf openvino onnx onnxruntime`), never in
edgepipe's: finetune_bench.py calls it with --nncf-python. CALIB.npz holds one array per model
input; EVAL.npz the same plus `labels`. The validation function runs the candidate model in
onnxruntime and returns its accuracy. Prints one JSON line: the seconds it took.
"""

from __future__ import annotations

import json
import sys
import time

import nncf
import numpy as np
import onnx
import onnxruntime as ort

BATCH = 32


def main() -> None:
    source, out, calib, held = sys.argv[1:5]
    max_drop = float(sys.argv[5]) if len(sys.argv) > 5 else 0.01
    calibration_rows = dict(np.load(calib))
    rows = dict(np.load(held))
    labels = rows.pop("labels")
    count = min(len(v) for v in calibration_rows.values())
    calibration = nncf.Dataset(range(count), lambda i: {k: v[i:i + 1] for k, v in calibration_rows.items()})
    starts = range(0, len(labels), BATCH)
    validation = nncf.Dataset(starts, lambda i: {k: v[i:i + BATCH] for k, v in rows.items()})

    def accuracy(model, items) -> float:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        hits = total = 0
        for i in items:
            logits = session.run(None, {k: v[i:i + BATCH] for k, v in rows.items()})[0]
            hits += int((logits.argmax(-1) == labels[i:i + BATCH]).sum())
            total += len(labels[i:i + BATCH])
        return hits / total

    started = time.perf_counter()
    quantized = nncf.quantize_with_accuracy_control(
        onnx.load(source), calibration, validation, validation_fn=accuracy, max_drop=max_drop,
        drop_type=nncf.DropType.ABSOLUTE, subset_size=count)
    onnx.save(quantized, out)
    print(json.dumps({"seconds": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
