"""Quantization over onnxruntime.quantization: recipes, candidates measured on this CPU.

Layout: `core` (what every search shares: the clock and time budget, when building stops, the
speedup needed, the choice), `recipes` (which candidates fit a graph and CPU), `rewrites` (graph
rewrites), `builders` (one model per recipe), `search` (the classifier's timing and confirmation,
with its collaborators `budget` and `judging`), `fallback` (accuracy-aware exclusion), `verdict`,
`report` (the typed record), `stage` (the classifier search), `decoder` (the decoder search) and
`api` (`quantize()`, which sends a model to the search for its kind)."""

from edgepipe.lazy import lazy_exports

# Imported on first use (the stage modules need torch or onnx; reports and configs do not).
__all__, __getattr__ = lazy_exports(__name__, {
    "edgepipe.quantize.config": ["EvalData", "QuantizeConfig"],
    "edgepipe.quantize.recipes": ["Recipe", "candidate_recipes"],
    "edgepipe.quantize.report": ["CandidateRow", "QuantizeReport"],
    "edgepipe.quantize.api": ["quantize", "weight_only_int4"],
    "edgepipe.quantize.decoder": ["DecoderQuantizeConfig"],
    "edgepipe.quantize.verdict": ["Verdict"],
})
