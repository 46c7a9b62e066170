"""Prune benchmark: train -> prune -> export -> quantize -> profile for CNN, MLP, Transformer.

    python benchmarks/prune_bench.py [--out benchmarks/results]

Uses examples/prune_pipeline.toml plus the Transformer; prints per model: accuracy unpruned /
pruned / deployed, params and MACs, ORT p50 speedups (pruned vs unpruned, deployed vs
unpruned FP32) and prune wall time.
"""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path

from edgepipe.pipeline import run_pipeline
from edgepipe.pipeline.config import from_dict

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    data = tomllib.loads((ROOT / "examples" / "prune_pipeline.toml").read_text())
    data["models"].append({"name": "transformer", "dataset": "marker", "train": {"epochs": 6, "lr": 0.002}})
    data["out_dir"] = str(args.out / "prune-run")
    result = run_pipeline(from_dict(data), log=print)
    print(result.table())
    lines = ["| model | acc trained | acc pruned | acc deployed | deployed | params | MACs | "
             "pruned/unpruned b32 | deployed/unpruned FP32 b1, b32 | prune s |", "|" + "---|" * 10]
    for name, model in result.manifest["models"].items():
        st = {k: v.get("record") or {} for k, v in model["stages"].items()}
        pr, q, prof = st["prune"], st.get("quantize", {}), st.get("profile", {})
        chosen = q.get("chosen")
        deployed_acc = chosen["accuracy"] if chosen else pr["accuracy_after"]
        cumulative = prof.get("cumulative_speedup", {})
        lines.append(
            f"| {name} | {st['train']['test_accuracy']:.4f} | {pr['accuracy_after']:.4f} | {deployed_acc:.4f} | "
            f"{'INT8 ' + chosen['recipe'] if chosen else 'FP32 (INT8 not faster)'} | "
            f"{pr['params_before']:,}→{pr['params_after']:,} | {pr['macs_before']:,}→{pr['macs_after']:,} | "
            f"{pr['speedup']['32']:.2f}x | {cumulative.get('1', 0):.2f}x, {cumulative.get('32', 0):.2f}x | "
            f"{pr['seconds']} |")
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prune_bench.md").write_text(text)
    (args.out / "prune_bench.json").write_text(json.dumps(result.manifest["models"], indent=1, default=str))
    print(text)


if __name__ == "__main__":
    main()
