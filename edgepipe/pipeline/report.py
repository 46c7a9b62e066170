"""The run table: one row per (model, stage) with parity, accuracy, latency, size and gates."""

from __future__ import annotations

from edgepipe.pipeline.stages import model_reports

COLUMNS = ("model", "stage", "parity", "accuracy", "p50/p99 ms", "size", "gate")


def _latency(profile, label: str) -> str:
    if profile is None:
        return "-"
    cells = []
    for stats in profile.latency.get(label, []):
        cell = f"b{stats['batch']}: {stats['p50_ms']:.3f}/{stats['p99_ms']:.3f}"
        speed = profile.speedup.get(label, {}).get(str(stats["batch"]))
        cells.append(cell + (f" ({speed:.2f}x)" if speed else ""))
    sessions = profile.models.get(label, {}).get("sessions")
    if cells and sessions:  # the intra-op threads (t) each batch ran with; "s": idle workers spin
        cells.append("[" + " ".join(f"b{b}:{v['threads']}t{'s' if v['spinning'] else ''}"
                                    for b, v in sessions.items()) + "]")
    return "  ".join(cells) or "-"


def _gates(model: dict, stage: str) -> str:
    results = [g for g in model.get("gates", []) if g["stage"] == stage]
    if not results:
        return "-"
    return " ".join(("ok " if g["ok"] else "FAIL ") + g["gate"] for g in results)


def _mb(size: int | None) -> str:
    return f"{size / 1e6:.2f} MB" if size else "-"


def _row(name: str, stage: str, accuracy: str = "-", latency: str = "-", size: str = "-",
         parity: str = "-", gate: str = "-") -> dict:
    return {"model": name, "stage": stage, "parity": parity, "accuracy": accuracy, "p50/p99 ms": latency,
            "size": size, "gate": gate}


def _prune_row(name: str, pr, gate: str) -> dict:
    speed = pr.speedup or {}
    latency = "  ".join(f"b{b}: {v['pruned']:.3f} ({speed[b]:.2f}x)" if b in speed else f"b{b}: {v['pruned']:.3f}"
                        for b, v in pr.p50_ms.items())
    return _row(name, f"prune ({pr.method}, {pr.params_before:,}->{pr.params_after:,} params)",
                f"{pr.accuracy_after:.4f} ({-pr.accuracy_drop * 100:+.1f} pt)", latency, gate=gate)


def _quantize_row(name: str, q, deployment: dict | None, profile, gate: str) -> dict:
    """`deployment`: the model's manifest entry (pipeline.deploy); None in manifests before it."""
    chosen = q.chosen if q is not None else None
    fp32_kept = bool(deployment and deployment.get("precision") == "fp32" and deployment.get("why"))
    if isinstance(chosen, str):  # the decoder search: its recipe, judged by NLL and greedy agreement
        row = next(r for r in q.candidates if r.get("recipe") == chosen)
        accuracy = f"nll {row['nll_increase']:+.3f}, agree {row['agreement']:.3f}"
        label = f"quantize ({chosen}" + ("; slower in profile: FP32 kept)" if fp32_kept else ")")
    elif chosen:
        accuracy = (f"{chosen.accuracy:.4f} ({-chosen.accuracy_drop * 100:+.1f} pt{_points(chosen)})"
                    if chosen.accuracy is not None else f"agree {chosen.agreement or 0:.4f}")
        label = f"quantize ({chosen.recipe}" + ("; slower in profile: FP32 kept)" if fp32_kept else ")")
    else:
        accuracy = "-"
        label = "quantize (none faster: FP32 kept)" if fp32_kept else "quantize (refused)"
    return _row(name, label, accuracy, _latency(profile, "int8"), _mb(q.size_bytes if q else None), gate=gate)


def _points(chosen) -> str:
    """The drop's 95% interval in points (as a change: negative is a loss), and "unresolved"."""
    band = chosen.accuracy_drop_interval
    if not band:
        return ""
    text = f" [{-band['high'] * 100:+.1f}, {-band['low'] * 100:+.1f}]"
    return text + (", unresolved" if chosen.accuracy_resolution == "unresolved" else "")


def _score(quant) -> str:
    """FP32's accuracy, with its 95% interval where labels gave one."""
    if quant is not None and isinstance(quant.fp32, dict):  # a decoder: held-out NLL per token
        return f"nll {quant.fp32['nll']:.3f}" if "nll" in quant.fp32 else "-"
    if quant is None or quant.fp32.accuracy is None:
        return "-"
    band = (quant.fp32.scores or {}).get("accuracy")
    return f"{quant.fp32.accuracy:.4f}" + (f" [{band['low']:.3f}, {band['high']:.3f}]" if band else "")


def _parity(parity: dict) -> str:
    """"ok 3.1e-06": the largest difference from torch (a decoder's over its prefill and cached steps)."""
    worst = parity.get("max_abs_diff", max((c.get("max_abs_diff", 0.0) for c in parity.get("cases", [])), default=0.0))
    return ("ok " if parity.get("ok", True) else "FAIL ") + f"{worst:.1e}"


def _export_label(exp) -> str:
    """"export (dynamo)"; after a fallback, which exporter was passed over and why."""
    passed_over = [a for a in exp.attempts if not a.get("ok")]
    if not passed_over:
        return f"export ({exp.exporter})"
    why = "; ".join(f"{a['exporter']} failed: {str(a.get('error') or a.get('parity'))[:60]}" for a in passed_over)
    return f"export ({exp.exporter}; {why})"


def build_rows(manifest: dict) -> list[dict]:
    rows = []
    for name, model in manifest.get("models", {}).items():
        stages = model.get("stages", {})
        reports = model_reports(model)
        profile = reports.get("profile")
        if "train" in reports:
            rows.append(_row(name, "train", f"{reports['train'].test_accuracy:.4f}", gate=_gates(model, "train")))
        if "prune" in reports:
            rows.append(_prune_row(name, reports["prune"], _gates(model, "prune")))
        if "export" in reports:
            exp, quant = reports["export"], reports.get("quantize")
            rows.append(_row(name, _export_label(exp), _score(quant),
                             _latency(profile, "fp32"), _mb(exp.size_bytes),
                             parity=_parity(exp.parity) if exp.parity else stages["export"]["status"],
                             gate=_gates(model, "export")))
        elif "export" in stages:  # failed before it measured anything
            rows.append(_row(name, "export", parity=stages["export"].get("status", "-"), gate=_gates(model, "export")))
        if "quantize" in stages:
            gate = " ".join(x for x in (_gates(model, "quantize"), _gates(model, "profile")) if x != "-") or "-"
            rows.append(_quantize_row(name, reports.get("quantize"), model.get("deployment"), profile, gate))
        if profile is not None and profile.cumulative_speedup:
            rows.append(_row(name, "cumulative vs unpruned FP32",
                             latency="  ".join(f"b{b}: {v:.2f}x" for b, v in profile.cumulative_speedup.items())))
    return rows


def render_table(rows: list[dict]) -> str:
    widths = {c: max([len(c)] + [len(str(r[c])) for r in rows]) for c in COLUMNS}
    line = "  ".join(c.ljust(widths[c]) for c in COLUMNS)
    out = [line, "  ".join("-" * widths[c] for c in COLUMNS)]
    out += ["  ".join(str(r[c]).ljust(widths[c]) for c in COLUMNS) for r in rows]
    return "\n".join(out)


def render_markdown(rows: list[dict], manifest: dict) -> str:
    hw = manifest.get("hardware", {})
    cpu = hw.get("cpu", {})
    head = [f"# edgepipe run — {manifest.get('status')}", "",
            f"CPU: {cpu.get('model')} ({', '.join(cpu.get('features', []))}), "
            f"{cpu.get('logical_cores')} logical cores; onnxruntime {hw.get('onnxruntime')}", "",
            "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    body = ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    failed = [f"- {name}: {g['message']}" for name, m in manifest.get("models", {}).items()
              for g in m.get("gates", []) if not g["ok"]]
    return "\n".join(head + body + ([""] + ["Failed gates:"] + failed if failed else []) + _costs(manifest)) + "\n"


def _costs(manifest: dict) -> list[str]:
    """What each stage cost: wall time and peak resident memory (of that stage alone where the
    OS can reset the high-water mark; else the process's peak so far, marked with *)."""
    rows = [f"| {name} | {stage} | {entry['seconds']} | {entry['peak_rss_mb']}"
            f"{'' if entry.get('peak_rss_scope') == 'work' else '*'} |"
            for name, model in manifest.get("models", {}).items()
            for stage, entry in model.get("stages", {}).items() if entry.get("peak_rss_mb") is not None]
    if not rows:
        return []
    return ["", "## What each stage cost", "", "| model | stage | wall s | peak RSS MB |", "|---|---|---|---|", *rows]
