"""Reports: Markdown and self-contained HTML with charts, from runs and profile results."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

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
    assert re.search(r"<circle cx=\"[\d.]+\" cy=\"[\d.]+\"", html)  # points really placed
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
