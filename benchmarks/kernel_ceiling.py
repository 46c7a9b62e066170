"""How much faster INT8 can be than FP32 on this CPU, one ONNX Runtime kernel at a time.

    python benchmarks/kernel_ceiling.py [--rounds 40] [--threads 1]

The zoo's INT8/FP32 ratios are bounded by what ORT's integer kernels buy on the CPU at hand. This
times single-op graphs (a MatMul with a constant weight, a 3x3 Conv, an LSTM) in FP32 and in each INT8 form
edgepipe builds (dynamic, static QDQ U8S8/U8U8, with and without reduce_range), interleaved in one
process, at the zoo's shapes and at a large GEMM. It prints p50 ms and FP32/INT8 per row, and the
CPU's integer features, so a missed target can be told apart from a weak recipe.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic, quantize_static

from edgepipe.quantize.calibration import ArrayCalibrationReader
from edgepipe.runtime import Engine, fingerprint, measure_interleaved
from edgepipe.runtime.hardware import read_cpu

# (label, M rows, K, N): the zoo MLP's layers at batch 1 and 32, its LSTM's recurrent GEMM, a big GEMM.
MATMULS = (("mlp-l1 b1", 1, 64, 512), ("mlp-l2 b1", 1, 512, 512),
           ("mlp-l1 b32", 32, 64, 512), ("mlp-l2 b32", 32, 512, 512),
           ("lstm-recurrent b32", 32, 128, 512), ("gemm 256x1024x1024", 256, 1024, 1024))
# (label, batch, in channels, out channels, height = width): the zoo CNN's second conv at batch 32.
CONVS = (("cnn-conv2 b32", 32, 32, 64, 8),)
# (label, batch, seq, input, hidden): the zoo LSTM, and a wider one.
LSTMS = (("lstm-zoo b1", 1, 24, 32, 128), ("lstm-zoo b32", 32, 24, 32, 128),
         ("lstm-h512 b32", 32, 24, 32, 512))


def _model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "kernel", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def matmul_model(k: int, n: int, rng) -> onnx.ModelProto:
    w = numpy_helper.from_array((rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32), "W")
    return _model([helper.make_node("MatMul", ["X", "W"], ["Y"])],
                  [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["m", k])],
                  [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["m", n])], [w])


def conv_model(cin: int, cout: int, hw: int, rng) -> onnx.ModelProto:
    w = numpy_helper.from_array((rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(9 * cin)).astype(np.float32), "W")
    return _model([helper.make_node("Conv", ["X", "W"], ["Y"], pads=[1, 1, 1, 1])],
                  [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["b", cin, hw, hw])],
                  [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["b", cout, hw, hw])], [w])


def lstm_model(seq: int, inp: int, hidden: int, rng) -> onnx.ModelProto:
    scale = 1 / np.sqrt(hidden)
    w = numpy_helper.from_array((rng.standard_normal((1, 4 * hidden, inp)) * scale).astype(np.float32), "W")
    r = numpy_helper.from_array((rng.standard_normal((1, 4 * hidden, hidden)) * scale).astype(np.float32), "R")
    node = helper.make_node("LSTM", ["X", "W", "R"], ["", "Y_h"], hidden_size=hidden)
    return _model([node], [helper.make_tensor_value_info("X", TensorProto.FLOAT, [seq, "b", inp])],
                  [helper.make_tensor_value_info("Y_h", TensorProto.FLOAT, [1, "b", hidden])], [w, r])


def variants(fp32: Path, x: np.ndarray, lstm: bool) -> dict[str, Path]:
    out = {"fp32": fp32}
    for rr in (False, True):
        path = fp32.with_name(f"{fp32.stem}.dyn{'-rr' if rr else ''}.onnx")
        quantize_dynamic(fp32, path, weight_type=QuantType.QInt8, reduce_range=rr)
        out[f"dynamic S8{' rr' if rr else ''}"] = path
    if lstm:
        return out
    for name, act, weight, rr in (("qdq U8S8", QuantType.QUInt8, QuantType.QInt8, False),
                                  ("qdq U8S8 rr", QuantType.QUInt8, QuantType.QInt8, True),
                                  ("qdq U8U8", QuantType.QUInt8, QuantType.QUInt8, False)):
        path = fp32.with_name(f"{fp32.stem}.{name.replace(' ', '-')}.onnx")
        quantize_static(fp32, path, ArrayCalibrationReader({"X": x}, samples=len(x)), activation_type=act,
                        weight_type=weight, reduce_range=rr)
        out[name] = path
    return out


def time_row(label: str, models: dict[str, Path], x: np.ndarray, rows: int, threads: int, rounds: int) -> dict:
    engines = {name: Engine(path, threads=threads) for name, path in models.items()}
    calls = {name: e.runner({"X": x}) for name, e in engines.items()}
    stats = measure_interleaved(calls, rows, rounds=rounds)
    fp32 = stats["fp32"].p50_ms
    row = {"case": label, "threads": threads, "fp32_p50_ms": round(fp32, 4),
           **{f"{name} x": round(fp32 / s.p50_ms, 2) for name, s in stats.items() if name != "fp32"}}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    cpu = read_cpu()
    print(json.dumps({"cpu": cpu.model, "features": cpu.features, "vnni": cpu.has_vnni}), flush=True)
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, m, k, n in MATMULS:
            path = Path(tmp) / f"mm_{k}_{n}.onnx"
            onnx.save(matmul_model(k, n, rng), path)
            x = np.maximum(rng.standard_normal((m, k)), 0).astype(np.float32)  # post-ReLU activations
            rows.append(time_row(label, variants(path, x, lstm=False), x, m, args.threads, args.rounds))
        for label, b, cin, cout, hw in CONVS:  # dynamic here is ConvInteger, which auto never proposes
            path = Path(tmp) / f"conv_{cin}_{cout}.onnx"
            onnx.save(conv_model(cin, cout, hw, rng), path)
            x = np.maximum(rng.standard_normal((b, cin, hw, hw)), 0).astype(np.float32)
            rows.append(time_row(label, variants(path, x, lstm=False), x, b, args.threads, args.rounds))
        for label, b, seq, inp, hidden in LSTMS:
            path = Path(tmp) / f"lstm_{hidden}.onnx"
            onnx.save(lstm_model(seq, inp, hidden, rng), path)
            x = rng.standard_normal((seq, b, inp)).astype(np.float32)
            rows.append(time_row(label, variants(path, x, lstm=True), x, b, args.threads, args.rounds))
    Path("benchmarks/results").mkdir(parents=True, exist_ok=True)
    Path("benchmarks/results/kernel_ceiling.json").write_text(
        json.dumps({"hardware": fingerprint(), "threads": args.threads, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
