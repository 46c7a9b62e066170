"""The run table: one row per (model, stage) with parity, accuracy, latency, size and gates."""

from __future__ import annotations

COLUMNS = ("model", "stage", "parity", "accuracy", "p50/p99 ms", "size", "gate")


def _latency(profile: dict, label: str) -> str:
    cells = []
    for stats in profile.get("latency", {}).get(label, []):
        cell = f"b{stats['batch']}: {stats['p50_ms']:.3f}/{stats['p99_ms']:.3f}"
        speed = profile.get("speedup", {}).get(label, {}).get(str(stats["batch"]))
        if speed is None and label == "int8":  # measured, then not deployed: show why
            speed = profile.get("int8_not_deployed", {}).get("speedup", {}).get(str(stats["batch"]))
        cells.append(cell + (f" ({speed:.2f}x)" if speed else ""))
    sessions = profile.get("models", {}).get(label, {}).get("sessions")
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


def build_rows(manifest: dict) -> list[dict]:
    rows = []
    for name, model in manifest.get("models", {}).items():
        stages = model.get("stages", {})
        rec = {s: e.get("record") or {} for s, e in stages.items()}
        status = {s: e.get("status") for s, e in stages.items()}
        profile = rec.get("profile", {})
        if "train" in rec:
            rows.append({"model": name, "stage": "train", "parity": "-",
                         "accuracy": f"{rec['train'].get('test_accuracy', 0):.4f}",
                         "p50/p99 ms": "-", "size": "-", "gate": _gates(model, "train")})
        if "prune" in rec and rec["prune"]:
            pr = rec["prune"]
            speed = pr.get("speedup") or {}
            rows.append({"model": name, "stage": f"prune ({pr['method']}, {pr['params_before']:,}->{pr['params_after']:,} params)",
                         "parity": "-",
                         "accuracy": f"{pr['accuracy_after']:.4f} ({-pr['accuracy_drop'] * 100:+.1f} pt)",
                         "p50/p99 ms": "  ".join(f"b{b}: {v['pruned']:.3f} ({speed[b]:.2f}x)" if b in speed
                                                 else f"b{b}: {v['pruned']:.3f}" for b, v in pr["p50_ms"].items()),
                         "size": "-", "gate": _gates(model, "prune")})
        if "export" in rec:
            exp = rec["export"]
            fp32_acc = rec.get("quantize", {}).get("fp32", {}).get("accuracy")
            rows.append({"model": name, "stage": f"export ({exp.get('exporter', '?')})",
                         "parity": f"ok {exp['parity']['max_abs_diff']:.1e}" if exp.get("parity") else status["export"],
                         "accuracy": f"{fp32_acc:.4f}" if fp32_acc is not None else "-",
                         "p50/p99 ms": _latency(profile, "fp32"), "size": _mb(exp.get("size_bytes")),
                         "gate": _gates(model, "export")})
        if "quantize" in stages:
            q = rec["quantize"]
            chosen = q.get("chosen")
            if chosen:
                acc = chosen.get("accuracy")
                accuracy = f"{acc:.4f} ({-chosen['accuracy_drop'] * 100:+.1f} pt)" if acc is not None else \
                    f"agree {chosen.get('agreement', 0):.4f}"
                label = f"quantize ({chosen['recipe']})"
                if stages["quantize"].get("status") == "not_deployed":
                    label = f"quantize ({chosen['recipe']}; slower in profile: FP32 kept)"
            else:
                deployed = stages["quantize"].get("status") == "not_deployed"
                accuracy, label = "-", "quantize (none faster: FP32 kept)" if deployed else "quantize (refused)"
            gate = _gates(model, "quantize")
            profile_gate = _gates(model, "profile")
            rows.append({"model": name, "stage": label, "parity": "-", "accuracy": accuracy,
                         "p50/p99 ms": _latency(profile, "int8"),
                         "size": _mb(q.get("size_bytes")),
                         "gate": " ".join(x for x in (gate, profile_gate) if x != "-") or "-"})
        cumulative = profile.get("cumulative_speedup")
        if cumulative:
            rows.append({"model": name, "stage": "cumulative vs unpruned FP32", "parity": "-", "accuracy": "-",
                         "p50/p99 ms": "  ".join(f"b{b}: {v:.2f}x" for b, v in cumulative.items()),
                         "size": "-", "gate": "-"})
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
    return "\n".join(head + body + ([""] + ["Failed gates:"] + failed if failed else [])) + "\n"
