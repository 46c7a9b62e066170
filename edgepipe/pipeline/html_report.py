"""Reports people read: Markdown and a self-contained HTML page with charts, from run
directories (manifest.json) and/or profile JSONs."""

from __future__ import annotations

import json
from html import escape
from pathlib import Path

from edgepipe.artifacts import atomic_path
from edgepipe.errors import InputError
from edgepipe.pipeline import charts
from edgepipe.pipeline.report import COLUMNS, build_rows, render_markdown
from edgepipe.pipeline.stages import model_reports

CSS = """body{font-family:sans-serif;max-width:1100px;margin:24px auto;color:#222}
table{border-collapse:collapse;font-size:12px;margin:8px 0 16px}
td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}
th{background:#f3f3f3}figure{margin:12px 0}figcaption{font-weight:bold;margin-bottom:4px}
.fail{color:#b00;font-weight:bold}.ok{color:#080}.note{color:#555;font-size:12px}"""


def load(path: Path) -> tuple[str, dict]:
    """('run', manifest) for a run directory or manifest.json; ('profile', record) for a profile JSON."""
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.json"
    if not path.is_file():
        raise InputError(f"no run directory or JSON at {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not JSON ({type(exc).__name__}): give a run directory, its "
                         "manifest.json or an `edgepipe profile --json` file") from None
    if "models" in data and "versions" in data:
        return "run", data
    if data.get("kind") == "decoder" and "rows" in data and "hardware" in data:
        return "decoder", data
    if "latency" in data and "hardware" in data:
        return "profile", data
    raise InputError(f"{path} is neither an edgepipe run manifest nor an `edgepipe profile --json` result")


def _table(headers, rows) -> str:
    head = "".join(f"<th>{escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _run_figures(manifest: dict) -> list[str]:
    figures = []
    points, throughput, ops = [], {}, []
    per_model_dist = []
    for name, model in manifest.get("models", {}).items():
        reports = model_reports(model)
        profile = reports.get("profile")
        latency = profile.latency if profile is not None else {}
        if not latency:
            continue
        largest = max(s["batch"] for s in next(iter(latency.values())))
        dist = [(f"{label} b{s['batch']}", s) for label, series in latency.items() for s in series]
        per_model_dist.append(charts.ranges(f"Latency distribution: {name} (per stage and batch)",
                                            sorted(dist, key=lambda d: (d[1]["batch"], d[0]))))
        for label, series in latency.items():
            throughput[f"{name} {label}"] = [(s["batch"], s["throughput"]) for s in series]
        p50 = {label: next(s["p50_ms"] for s in series if s["batch"] == largest) for label, series in latency.items()}
        quant, prune = reports.get("quantize"), reports.get("prune")
        if quant is not None and isinstance(quant.fp32, dict):  # a decoder: judged by NLL, not accuracy
            quant = None
        accuracy = {"fp32": quant.fp32.accuracy if quant else None,
                    "int8": quant.chosen.accuracy if quant and quant.chosen else None,
                    "unpruned": reports["train"].test_accuracy if prune and "train" in reports else None}
        if accuracy["fp32"] is None and prune:
            accuracy["fp32"] = prune.accuracy_after
        points += [(f"{name} {label}", p50[label], acc) for label, acc in accuracy.items()
                   if acc is not None and label in p50]
        for row in (profile.operators or {}).get("by_op_type", [])[:6]:
            ops.append((f"{name}: {row['op']}", row["us_per_run"]))
    figures += per_model_dist
    figures.append(charts.scatter("Accuracy vs p50 latency (largest batch) across stages", points,
                                  "p50 latency (ms)", "held-out accuracy"))
    figures.append(charts.lines("Throughput vs batch size", throughput, "batch", "samples/s"))
    figures.append(charts.hbars("Top operators of each deployed model (onnxruntime profiler)", ops, "us/run"))
    return [f for f in figures if f]


def _profile_figures(record: dict) -> list[str]:
    name = Path(record.get("model", "model")).name
    runs = record.get("thread_sweep") or [{"threads": record.get("engine", {}).get("threads", "default"),
                                           "latency": record["latency"]}]
    dist = [(f"{name} t={run['threads']} b{s['batch']}", s) for run in runs for s in run["latency"]]
    throughput = {f"{name} t={run['threads']}": [(s["batch"], s["throughput"]) for s in run["latency"]]
                  for run in runs}
    ops = [(row["op"], row["us_per_run"]) for row in (record.get("operators") or {}).get("by_op_type", [])[:10]]
    figures = [charts.ranges(f"Latency distribution: {name}", dist),
               charts.lines(f"Throughput vs batch: {name}", throughput, "batch", "samples/s"),
               charts.hbars(f"Time per operator type: {name}", ops, "us/run")]
    return [f for f in figures if f]


DECODER_COLUMNS = ["batch", "prompt", "TTFT ms", "TPOT p50 ms", "TPOT p90 ms", "tokens/s"]


def _decoder_rows(record: dict) -> list[list]:
    return [[r["batch"], r["prompt"], f"{r['ttft_ms']:.2f}", f"{r['tpot_ms']:.3f}", f"{r['tpot_p90_ms']:.3f}",
             f"{r['tokens_per_s']:.1f}"] for r in record["rows"]]


def _decoder_markdown(record: dict) -> str:
    head = f"# Decoder profile: {record['model']}\n\n{_device(record['hardware'])}\n\n" \
           f"Load {record['load_s']:.2f} s; peak RSS {record['peak_rss_mb']} MB.\n\n"
    return head + "| " + " | ".join(DECODER_COLUMNS) + " |\n" + "|---" * len(DECODER_COLUMNS) + "|\n" + "".join(
        "| " + " | ".join(map(str, row)) + " |\n" for row in _decoder_rows(record))


def _decoder_html(record: dict) -> str:
    name = Path(record["model"]).name
    batches = sorted({r["batch"] for r in record["rows"]})
    ttft = {f"batch {b}": [(r["prompt"], r["ttft_ms"]) for r in record["rows"] if r["batch"] == b] for b in batches}
    rate = {f"prompt {p}": [(r["batch"], r["tokens_per_s"]) for r in record["rows"] if r["prompt"] == p]
            for p in sorted({r["prompt"] for r in record["rows"]})}
    tpot = [(f"b{r['batch']} prompt {r['prompt']}", r["tpot_ms"]) for r in record["rows"]]
    figures = [charts.lines(f"Time to first token vs prompt length: {name}", ttft, "prompt tokens", "ms"),
               charts.hbars(f"Time per output token (p50): {name}", tpot, "ms"),
               charts.lines(f"Tokens per second vs batch: {name}", rate, "batch", "tokens/s")]
    return (f"<h2>Decoder profile {escape(record['model'])}</h2><p class='note'>{escape(_device(record['hardware']))}"
            f"; load {record['load_s']:.2f} s; peak RSS {record['peak_rss_mb']} MB</p>"
            + _table(DECODER_COLUMNS, _decoder_rows(record)) + "".join(f for f in figures if f))


def operators_markdown(operators: dict | None, title: str = "Time per operator type") -> str:
    """The per-operator breakdown (`--ops`) as a Markdown table, or nothing without one."""
    if not operators:
        return ""
    if "skipped" in operators:
        return f"\n## {title}\n\n{operators['skipped']}\n"
    rows = "".join(f"| {r['op']} | {r['us_per_run']:.1f} | {r['share']:.1%} |\n" for r in operators["by_op_type"])
    return f"\n## {title}\n\n| op type | us per run | share |\n|---|---|---|\n{rows}"


def _operators_table(operators: dict | None) -> str:
    if not operators:
        return ""
    if "skipped" in operators:
        return f"<h3>Time per operator type</h3><p>{escape(operators['skipped'])}</p>"
    return "<h3>Time per operator type</h3>" + _table(
        ["op type", "us per run", "share"],
        [[r["op"], f"{r['us_per_run']:.1f}", f"{r['share']:.1%}"] for r in operators["by_op_type"]])


def _device(hardware: dict) -> str:
    cpu = hardware.get("cpu", {})
    return (f"{cpu.get('model')} ({', '.join(cpu.get('features', []))}), {cpu.get('logical_cores')} logical "
            f"cores; {hardware.get('os')}; onnxruntime {hardware.get('onnxruntime')}")


def build(paths: list[Path]) -> tuple[str, str]:
    """(markdown, html) for one or more runs / profile results."""
    md_parts, html_parts = [], []
    for path in paths:
        kind, data = load(path)
        if kind == "run":
            rows = build_rows(data)
            status = data.get("status")
            md_parts.append(render_markdown(rows, data) + "".join(
                operators_markdown(getattr(model_reports(m).get("profile"), "operators", None),
                                   f"{name}: time per operator type (deployed model)")
                for name, m in data.get("models", {}).items()))
            failed = [f"{m}: {g['message']}" for m, model in data["models"].items()
                      for g in model.get("gates", []) if not g["ok"]]
            html_parts.append(
                f"<h2>Run {escape(str(path))} — <span class='{'ok' if status == 'passed' else 'fail'}'>"
                f"{escape(str(status))}</span></h2><p class='note'>{escape(_device(data.get('hardware', {})))}</p>"
                + _table(COLUMNS, [[r[c] for c in COLUMNS] for r in rows])
                + ("<p class='fail'>Failed gates:</p><ul>" + "".join(f"<li>{escape(f)}</li>" for f in failed)
                   + "</ul>" if failed else "")
                + "".join(_run_figures(data)))
        elif kind == "decoder":
            md_parts.append(_decoder_markdown(data))
            html_parts.append(_decoder_html(data))
        else:
            lat = data["latency"]
            md_parts.append(f"# Profile: {data['model']}\n\n{_device(data['hardware'])}\n\n| batch | p50 ms | p99 ms | "
                            "samples/s |\n|---|---|---|---|\n" + "".join(
                                f"| {s['batch']} | {s['p50_ms']:.4f} | {s['p99_ms']:.4f} | {s['throughput']:.1f} |\n"
                                for s in lat) + operators_markdown(data.get("operators")))
            html_parts.append(
                f"<h2>Profile {escape(data['model'])}</h2><p class='note'>{escape(_device(data['hardware']))}</p>"
                + _table(["batch", "p50 ms", "p90 ms", "p99 ms", "max ms", "samples/s"],
                         [[s["batch"], f"{s['p50_ms']:.4f}", f"{s['p90_ms']:.4f}", f"{s['p99_ms']:.4f}",
                           f"{s['max_ms']:.4f}", f"{s['throughput']:.1f}"] for s in lat])
                + _operators_table(data.get("operators"))
                + "".join(_profile_figures(data)))
    html = (f"<!doctype html><html><head><meta charset='utf-8'><title>edgepipe report</title>"
            f"<style>{CSS}</style></head><body><h1>edgepipe report</h1>{''.join(html_parts)}</body></html>")
    return "\n\n".join(md_parts), html


def write(paths: list[Path], out_dir: Path, stem: str = "report") -> tuple[Path, Path]:
    markdown, html = build(paths)
    md_path, html_path = out_dir / f"{stem}.md", out_dir / f"{stem}.html"
    for target, text in ((md_path, markdown), (html_path, html)):
        with atomic_path(target) as tmp:
            tmp.write_text(text)
    return md_path, html_path
