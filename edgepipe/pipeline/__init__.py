"""Pipeline: config, stage orchestration, gates, manifest and report."""

from edgepipe.pipeline.config import Budgets, PipelineConfig, demo_config, load
from edgepipe.pipeline.runner import RunResult, run_pipeline

__all__ = ["Budgets", "PipelineConfig", "RunResult", "demo_config", "load", "run_pipeline"]
