"""Reference zoo, offline datasets and training."""

from edgepipe.lazy import lazy_exports

# Imported on first use (the stage modules need torch or onnx; reports and configs do not).
__all__, __getattr__ = lazy_exports(__name__, {
    "edgepipe.models.data": ["Dataset", "load_dataset"],
    "edgepipe.models.training": ["TrainConfig", "load_checkpoint", "save_checkpoint", "train"],
    "edgepipe.models.report": ["TrainReport"],
    "edgepipe.models.zoo": ["ZOO"],
})
