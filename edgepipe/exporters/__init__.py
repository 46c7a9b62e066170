"""torch -> ONNX export with a parity verdict."""

from edgepipe.exporters.onnx_export import ExportConfig, check_parity, export
from edgepipe.exporters.source import ModelSource, load_source

__all__ = ["ExportConfig", "ModelSource", "check_parity", "export", "load_source"]
