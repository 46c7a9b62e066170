"""Optimum's dynamic INT8 quantization of an ONNX model, as a user of optimum-onnx would run it.

    PEER_PYTHON benchmarks/peers/optimum_quantize.py FP32.onnx OUT_DIR [avx2|avx512_vnni]

Runs in the peer's own environment (`pip install optimum-onnx`), never in edgepipe's:
hf_models.py calls it with --optimum-python, in its own process, so the wall time it records
(imports included, as for edgepipe's command) is what a user waits. `AutoQuantizationConfig`
for the CPU named (default avx2: this project's machine has no VNNI), dynamic, per-tensor: the
configuration Optimum's documentation leads with. Prints one JSON line: the seconds it took.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main() -> None:
    started = time.perf_counter()
    source, out = Path(sys.argv[1]), Path(sys.argv[2])
    target = sys.argv[3] if len(sys.argv) > 3 else "avx2"
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    quantizer = ORTQuantizer.from_pretrained(source.parent, file_name=source.name)
    config = getattr(AutoQuantizationConfig, target)(is_static=False, per_channel=False)
    quantizer.quantize(save_dir=out, quantization_config=config)
    print(json.dumps({"seconds": round(time.perf_counter() - started, 2), "config": target}))


if __name__ == "__main__":
    main()
