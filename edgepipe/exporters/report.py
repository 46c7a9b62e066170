"""The export stage's report: the exporter that passed parity, every attempt, and the graph."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from edgepipe.reports import Report


@dataclass
class ExportReport(Report):
    stage: ClassVar[str] = "export"

    exporter: str  # the exporter whose model passed parity
    attempts: list[dict]  # every exporter tried, in order, with its parity summary or error
    parity: dict[str, Any]
    opset: int
    ir_version: int
    size_bytes: int
    inputs: list[dict]  # InputSpec.to_dict() of each input
    outputs: list[str]
    source: str

    @property
    def input_names(self) -> list[str]:
        return [i["name"] for i in self.inputs]
