"""onnxruntime.transformers' offline graph fusions as a quantize source, tried only when
asked (QuantizeConfig.try_fusions) and kept only when the fused FP32 model matches the original
and is measurably faster."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgepipe import interrupts
from edgepipe.errors import QuantizationError
from edgepipe.quantize.config import EvalData
from edgepipe.quantize.evaluation import evaluate
from edgepipe.quantize.rewrites import transformer_fusions
from edgepipe.quantize.search import Search
from edgepipe.runtime.engine import Engine
from edgepipe.runtime.timing import measure_interleaved


def fused_source(search: Search) -> tuple[Path, dict]:
    """The FP32 model to quantize: onnxruntime.transformers' fusions when the fused model matches
    the original and is measurably faster (it often is not), else the model as given."""
    out = search.work / "transformer_optimized.onnx"
    try:
        fused_ops = transformer_fusions(search.onnx_path, out)
        kept, speedup = time_fused(search, out)
    except QuantizationError as exc:
        return search.onnx_path, {"tried": True, "kept": False, "why": str(exc)}
    except Exception as exc:  # the optimizer raises many types on graphs it does not expect
        interrupts.reraise()
        return search.onnx_path, {"tried": True, "kept": False, "why": f"{type(exc).__name__}: {str(exc)[:200]}"}
    record = {"tried": True, "kept": kept, "fused_ops": fused_ops, "speedup_fp32": round(speedup, 3),
              "why": "faster" if kept else "not measurably faster"}
    return (out if kept else search.onnx_path), record


def time_fused(search: Search, fused: Path) -> tuple[bool, float]:
    """Whether the transformer-fused FP32 model matches the original and is measurably faster
    at the largest batch size: (keep, its speedup)."""
    engine = Engine(fused, providers="cpu", threads=search.config.threads, spinning=False)
    rows = 16  # a fusion that breaks the model shows on any rows; all of them would cost a full evaluation
    some = EvalData({k: v[:rows] for k, v in search.eval_data.inputs.items()})
    got, _, _ = evaluate(engine, some)
    if not np.allclose(got, search.reference[:rows], atol=1e-3, rtol=1e-3):
        raise QuantizationError("fused model's outputs differ from the original")
    batch = max(search.config.batch_sizes)
    feeds = search.timing_feeds(batch)
    rounds = search.budget.rounds_within("fusions", search.config.rounds, 2, search.swept(1), share=0.15)
    stats = measure_interleaved({"fp32": search.fp32.runner(feeds), "fused": engine.runner(feeds)}, batch,
                                rounds=rounds)
    speedup = stats["fp32"].p50_ms / stats["fused"].p50_ms
    search.drop_fp32()
    return speedup >= 1 + search.config.speedup_margin, speedup
