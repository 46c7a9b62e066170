"""Reports: Markdown and self-contained HTML with charts, from runs and profile results."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import pytest

from edgepipe.pipeline import config as config_mod
from edgepipe.pipeline import run_pipeline
from edgepipe.runtime.profiling import profile_model


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.external = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for key, value in attrs:
            if key in ("src", "href") and value and not value.startswith("#"):
                self.external.append(value)


def parse(html: str) -> _Collector:
    collector = _Collector()
    collector.feed(html)
    return collector


@pytest.mark.slow  # trains and runs a pipeline
def test_run_writes_markdown_and_self_contained_html_with_charts(tmp_path):
    (tmp_path / "p.toml").write_text(
        'out_dir = "run"\n[train]\nepochs = 2\n[export]\nexporters = ["torchscript"]\n'
        '[quantize]\nbatch_sizes = [32]\nrounds = 4\n[profile]\nbatch_sizes = [1, 8]\nrounds = 4\n'
        '[budgets]\nmin_int8_speedup = 0.0\nmax_accuracy_drop = 0.05\n[[models]]\nname = "mlp"\n')
    result = run_pipeline(config_mod.load(tmp_path / "p.toml"))
    html = (result.run_dir / "report.html").read_text()
    page = parse(html)
    assert page.tags.count("svg") >= 4 and page.tags.count("table") == 1
    assert not page.external  # self-contained: nothing to fetch
    for title in ("Latency distribution: mlp", "Accuracy vs p50 latency", "Throughput vs batch",
                  "Top operators"):
        assert title in html
    assert re.search(r'<g id="PathCollection_\d+">', html)  # the scatter's points really placed
    assert "nan" not in html.lower().replace("nanos", "")
    markdown = (result.run_dir / "report.md").read_text()
    assert "| mlp | quantize (" in markdown


def test_report_command_on_profile_json_and_bad_input(zoo, tmp_path, cli):
    record = profile_model(zoo["cnn"].onnx, (1, 4), thread_sweep=(1, 2), operators=True, min_time_s=0.01)
    (tmp_path / "p.json").write_text(json.dumps(record))
    result = cli("report", tmp_path / "p.json", "--out", tmp_path, "--name", "dev")
    assert result.exit_code == 0, result.output
    html = (tmp_path / "dev.html").read_text()
    assert parse(html).tags.count("svg") == 3 and "Time per operator type" in html and "Conv" in html
    assert "| 4 |" in (tmp_path / "dev.md").read_text()
    (tmp_path / "x.json").write_text('{"hello": 1}')
    bad = cli("report", tmp_path / "x.json", "--out", tmp_path)
    assert bad.exit_code == 2 and "neither an edgepipe run manifest" in bad.output


def _stats(batch: int, p50: float) -> dict:
    return {"batch": batch, "iterations": 100, "p50_ms": p50, "p90_ms": p50 * 1.1, "p99_ms": p50 * 1.3,
            "mean_ms": p50, "min_ms": p50 * 0.9, "max_ms": p50 * 1.5, "throughput": batch / p50 * 1000}


def _manifest() -> dict:
    """Two models with FP32 and INT8 timed at batch 1 and 32 (latencies 100x apart), no training."""
    models = {}
    for name, base in (("tiny", 0.02), ("big", 2.0)):
        latency = {"fp32": [_stats(1, base), _stats(32, base * 8)], "int8": [_stats(1, base / 2), _stats(32, base * 4)]}
        profile = {"models": {k: {"sessions": {"1": {"threads": 1, "spinning": False}}} for k in latency},
                   "baseline": "fp32", "latency": latency, "speedup": {"int8": {"1": 2.0, "32": 2.0}},
                   "threads": "ort-default", "intra_op_spinning": False, "trials": 3, "hardware": {},
                   "operators": {"by_op_type": [{"op": "QLinearMatMulWithAVeryLongFusedOperatorName",
                                                 "us_per_run": 12.5,
                                                 "share": 0.8}, {"op": "Relu", "us_per_run": 3.1, "share": 0.2}]}}
        models[name] = {"stages": {"profile": {"status": "ok", "record": profile}}, "gates": []}
    return {"schema": 2, "versions": {}, "hardware": {"cpu": {"model": "test CPU"}}, "status": "passed",
            "models": models}


def test_charts_keep_one_colour_per_precision_full_labels_and_log_axes(tmp_path, cli):
    from edgepipe.pipeline.charts import STAGE_COLORS

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(_manifest()))
    result = cli("report", tmp_path / "run", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    html = (tmp_path / "out" / "report.html").read_text()
    figures = re.findall(r"<figure>.*?</figure>", html, flags=re.S)
    with_stages = [f for f in figures if "fp32" in f and "int8" in f]
    assert len(with_stages) >= 3  # both latency distributions and the throughput chart
    for figure in with_stages:  # FP32 is the same blue and INT8 the same orange in every chart
        assert STAGE_COLORS["fp32"] in figure and STAGE_COLORS["int8"] in figure
    throughput = next(f for f in figures if "Throughput vs batch" in f)
    assert "samples/s (log)" in throughput  # 100x apart: a linear axis would flatten the tiny model
    assert "int8 b32" in html  # labels whole, not cut to 'b3'
    assert "QLinearMatMulWithAVeryLongFusedOperatorName" in html  # operator names whole
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "tiny: time per operator type (deployed model)" in markdown and "| Relu | 3.1 | 20.0% |" in markdown


def test_every_line_of_a_chart_has_its_own_colour_unless_it_names_a_stage():
    from edgepipe.pipeline.charts import STAGE_COLORS, line_colors, lines

    rate = {"prompt 8": [(1, 100.0), (2, 180.0)], "prompt 40": [(1, 90.0), (2, 170.0)]}
    colors = line_colors(list(rate))
    assert colors["prompt 8"] != colors["prompt 40"]  # their hashed colours collide
    svg = lines("Tokens per second vs batch", rate, "batch", "tokens/s")
    assert all(c in svg for c in colors.values())
    staged = line_colors(["mlp fp32", "cnn fp32", "mlp int8"])
    assert staged == {"mlp "
                      "fp32": STAGE_COLORS["fp32"], "cnn fp32": STAGE_COLORS["fp32"], "mlp int8": STAGE_COLORS["int8"]}
