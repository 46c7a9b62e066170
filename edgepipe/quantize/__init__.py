"""INT8 quantization over onnxruntime.quantization: recipes, candidates measured on this CPU.

Layout: `recipes` (which candidates fit a graph and CPU), `rewrites` (graph rewrites),
`builders` (one model per recipe), `search` (timing and confirmation), `fallback`
(accuracy-aware exclusion), `verdict`, `report` (the typed record) and `stage` (the stage)."""

import importlib

# Imported on first use: the stage modules need torch or onnx, the reports do not.
_WHERE = {
    "EvalData": "edgepipe.quantize.config",
    "QuantizeConfig": "edgepipe.quantize.config",
    "Recipe": "edgepipe.quantize.recipes",
    "candidate_recipes": "edgepipe.quantize.recipes",
    "CandidateRow": "edgepipe.quantize.report",
    "QuantizeReport": "edgepipe.quantize.report",
    "quantize": "edgepipe.quantize.stage",
    "Verdict": "edgepipe.quantize.verdict",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
