"""INT8 quantization over onnxruntime.quantization: recipes, candidates measured on this CPU."""

from edgepipe.quantize.auto import EvalData, QuantizeConfig, quantize
from edgepipe.quantize.recipes import Recipe, candidate_recipes

__all__ = ["EvalData", "QuantizeConfig", "Recipe", "candidate_recipes", "quantize"]
