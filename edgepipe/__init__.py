"""edgepipe: PyTorch -> verified, compressed ONNX deployments with chained budgets."""

__version__ = "0.1.0"

from edgepipe.errors import (  # noqa: E402
    ConfigError,
    EdgepipeError,
    ExportError,
    GateFailed,
    InputError,
    ParityError,
)

__all__ = ["ConfigError", "EdgepipeError", "ExportError", "GateFailed", "InputError",
           "ParityError", "__version__"]
