"""torch -> ONNX export with a parity verdict."""

from edgepipe.lazy import lazy_exports

# Imported on first use (the stage modules need torch or onnx; reports and configs do not).
__all__, __getattr__ = lazy_exports(__name__, {
    "edgepipe.exporters.onnx_export": ["ExportConfig", "check_parity", "export", "export_module"],
    "edgepipe.exporters.report": ["ExportReport"],
    "edgepipe.exporters.source": ["ModelSource", "load_source"],
})
