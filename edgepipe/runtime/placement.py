"""ONNX Runtime's own profiler: per-node kernel time, which provider ran each node, and the
per-operator breakdown. Torch-free."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Mapping

import numpy as np

from edgepipe.runtime.sessions import new_session, resolve_providers
from edgepipe.runtime.workdirs import work_dir


def profile_events(model, feeds: Mapping[str, np.ndarray], session_providers: list, *,
                   threads: int | None = None, iterations: int = 30, warmup: int = 10) -> list[dict]:
    """Run `model` `warmup + iterations` times under ONNX Runtime's profiler; its JSON events,
    less the node events of the first `warmup` runs: a session's first calls start its thread
    pool and allocate its buffers, and a per-operator time must be what a warm call spends.
    `session_providers`: what InferenceSession takes (names, or (name, options) pairs)."""
    with work_dir("ops") as tmp:
        session = new_session(model, session_providers, threads=threads, profile_prefix=str(tmp / "ort"))
        for _ in range(warmup + iterations):
            session.run(None, dict(feeds))
        events = json.loads(Path(session.end_profiling()).read_text())
    starts = sorted(e.get("ts", 0) for e in events if e.get("name") == "model_run")
    if len(starts) > warmup:
        events = [e for e in events if e.get("cat") != "Node" or e.get("ts", 0) >= starts[warmup]]
    return events


def node_times(events: list[dict]) -> dict[str, dict]:
    """{node name: {"node", "op", "provider", "us", "runs_us"}} from profiler events: kernel time
    summed, and each run's."""
    by_node: dict[str, dict] = {}
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        args = event.get("args", {})
        node = event["name"][: -len("_kernel_time")]
        entry = by_node.setdefault(node, {"node": node, "op": args.get("op_name", "?"),
                                          "provider": args.get("provider"), "us": 0.0, "runs_us": []})
        entry["us"] += event.get("dur", 0)
        entry["runs_us"].append(event.get("dur", 0))
    return by_node


def placement_report(by_node: dict[str, dict], providers: list[str]) -> dict:
    """Which provider ran each node. `fell_back`: nodes not on the preferred (first) provider,
    e.g. the CPU nodes of a CUDA session, with the copies ORT inserted around them."""
    preferred = providers[0] if providers else None
    fell_back = [] if preferred in (None, "CPUExecutionProvider") else [
        {"node": n["node"], "op": n["op"], "provider": n["provider"]}
        for n in by_node.values() if n["provider"] != preferred]
    return {"providers": list(providers),
            "nodes_per_provider": dict(Counter(n["provider"] for n in by_node.values())),
            "fell_back": fell_back,
            "memcpy_nodes": sum(n["op"].startswith("Memcpy") for n in by_node.values())}


def operator_profile(model_path, feeds: Mapping[str, np.ndarray], *, providers="auto",
                     threads: int | None = None, iterations: int = 30, top: int = 15) -> dict:
    """Per-operator time from ONNX Runtime's own profiler, warm calls only: each node's median
    over `iterations` runs, summed by op type, with the provider each node ran in. The shares
    are of the nodes' summed medians, which a whole warm call's p50 bounds."""
    names = resolve_providers(providers)[0]
    events = profile_events(model_path, feeds, names, threads=threads, iterations=iterations)
    by_node = node_times(events)
    runs = [e.get("dur", 0) for e in events if e.get("name") == "model_run"][-iterations:]
    median = {name: float(np.median(n["runs_us"])) for name, n in by_node.items()}
    by_op: dict[str, float] = defaultdict(float)
    for name, entry in by_node.items():
        by_op[entry["op"]] += median[name]
    total = sum(by_op.values()) or 1.0
    ops = sorted(({"op": op, "us_per_run": round(us, 2), "share": round(us / total, 4)}
                  for op, us in by_op.items()), key=lambda r: r["us_per_run"], reverse=True)
    nodes = sorted(by_node.values(), key=lambda r: median[r["node"]], reverse=True)
    return {
        "iterations": iterations,
        "run_us_p50": round(float(np.median(runs)), 2) if runs else None,  # a whole profiled call
        "by_op_type": ops,
        "by_node": [{"node": n["node"], "op": n["op"], "provider": n["provider"],
                     "us_per_run": round(median[n["node"]], 2), "share": round(median[n["node"]] / total, 4)}
                    for n in nodes[:top]],
        "nodes_per_provider": placement_report(by_node, names)["nodes_per_provider"],
    }
