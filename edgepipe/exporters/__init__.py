"""torch -> ONNX export with a parity verdict."""

import importlib

# Imported on first use: the stage modules need torch or onnx, the reports do not.
_WHERE = {
    "ExportConfig": "edgepipe.exporters.onnx_export",
    "check_parity": "edgepipe.exporters.onnx_export",
    "export": "edgepipe.exporters.onnx_export",
    "export_module": "edgepipe.exporters.onnx_export",
    "ExportReport": "edgepipe.exporters.report",
    "ModelSource": "edgepipe.exporters.source",
    "load_source": "edgepipe.exporters.source",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
