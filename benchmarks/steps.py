"""One benchmark step in its own process: its wall time, exit code, output tail and peak memory.

Peak memory is sampled from outside, every 20 ms, as the summed RSS of the process and all its
descendants. The process's own high-water mark (ru_maxrss) cannot be used: edgepipe resets it
per phase of a stage (/proc/self/clear_refs) to record each phase's peak, so after a run it
holds only the last phase's peak, and it never counts child processes.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                todo.extend(int(c) for c in task.read_text().split())
            except (OSError, ValueError):
                pass
    return pids


def run_step(args: list[str], python: str | None = None, tail: int = 12) -> dict:
    """Run one edgepipe command (or, with `python`, that interpreter with `args`)."""
    started = time.perf_counter()
    command = [python, *args] if python else [sys.executable, "-m", "edgepipe", *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], sum(_rss_kb(p) for p in _tree(proc.pid)))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.stdout.read()
    code = proc.wait()
    sampler.join()
    return {"seconds": round(time.perf_counter() - started, 1), "peak_rss_mb": round(peak[0] / 1024),
            "exit": code, "tail": output.strip().splitlines()[-tail:]}
