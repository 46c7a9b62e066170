"""docs/benchmarks.md from the results files benchmarks/ writes (benchmarks/results/*.json):
every table is generated, each under the machine (CPU and its ISA) and date it was measured on.

    python benchmarks/make_docs.py [--results benchmarks/results] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ISA = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def machine(record: dict) -> str:
    cpu = record["machine"]["cpu"]
    flags = [f for f in ISA if f in (cpu.get("flags") or cpu.get("features") or [])]
    return (f"{cpu.get('model') or cpu.get('model_name') or 'CPU'}, {cpu.get('cores') or cpu.get('logical_cores')} "
            f"cores ({', '.join(flags) or 'no AVX2'}); onnxruntime {record['machine']['onnxruntime']}; "
            f"measured {record['date']}")


def interval(score: dict | None) -> str:
    return f"{score['value']:.3f} [{score['low']:.3f}, {score['high']:.3f}]" if score else "-"


def byod(record: dict) -> list[str]:
    lines = ["## Your own data: quantize fed from a CSV and an image folder", "",
             f"Machine: {machine(record)}. Command: `python benchmarks/byod_bench.py`.", ""]
    for name, model in record["models"].items():
        fp32 = model["fp32"]
        lines += [f"### {name} classifier, `--data {model['data']}` (trained {model['train_seconds']} s)", "",
                  f"Rows: {model['split']}. FP32: accuracy {interval(fp32['scores']['accuracy'])}, macro-F1 "
                  f"{interval(fp32['scores']['macro_f1'])}; p50 "
                  + ", ".join(f"{v:.3f} ms at batch {b}" for b, v in fp32["p50_ms"].items())
                  + f"; {fp32['size_bytes'] / 1e6:.2f} MB.", "",
                  "| candidate | accuracy [95%] | macro-F1 [95%] | drop vs FP32 [95%] | budget | speedup | size MB | "
                  "verdict |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in model["candidates"]:
            scores = c["scores"] or {}
            speed = ", ".join(f"{v:.2f}x@b{b}" for b, v in (c["speedup"] or {}).items()) or "-"
            size = f"{c['size_bytes'] / 1e6:.2f}" if c["size_bytes"] else "-"
            resolution = c["accuracy_resolution"] or "-"
            if c["rows_needed"]:
                resolution += f" (~{c['rows_needed']} more rows)"
            lines.append(f"| {c['recipe']} | {interval(scores.get('accuracy'))} | {interval(scores.get('macro_f1'))} | "
                         f"{interval(c['accuracy_drop_interval'])} | {resolution} | {speed} | {size} | "
                         f"{c['verdict'].replace('|', '/')} |")
        lines += ["", f"Chosen: {model['chosen']}." if model['chosen'] else "Refused: no candidate both faster and "
                "within the budget.", ""]
    lines += ["### Reading a large CSV", "",
              "Held-out (20%, at most `--eval-rows`) and calibration rows (256) read through the text model's "
              "tokenizer in a fresh process (peak RSS includes the interpreter and onnxruntime); reading stops "
              "once they are full.", "",
              "| rows in file | file MB | --eval-rows | rows judged | seconds | peak RSS MB |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['rows_in_file']:,} | {r['file_mb']} | {r.get('max_test', 1000):,} | {r['held_out_rows']:,} | "
              f"{r['seconds']} | {r['peak_rss_mb']} |" for r in record["reading"]]
    return lines + [""]


def zoo(record: dict) -> list[str]:
    lines = ["## The zoo: INT8 against FP32 and PyTorch eager", "",
             f"Machine: {machine(record)}. Command: `python benchmarks/zoo_bench.py` (the demo pipeline, then "
             f"{record['rounds']} interleaved rounds per model and batch size). As deployed: each batch size on "
             "the threads quantize found fastest for it; at ORT defaults: all cores, spinning workers.", "",
             "| model | accuracy torch / FP32 / INT8 | recipe | p50 ms batch 1: torch / FP32 / INT8 | "
             "p50 ms batch 32: torch / FP32 / INT8 | INT8 vs FP32 as deployed (b1, b32) | "
             "INT8 vs FP32 at ORT defaults (b1, b32) | size FP32 → INT8 MB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        p1, p32 = r["p50_ms"]["1"], r["p50_ms"]["32"]
        lines.append(
            f"| {r['model']} | {r['accuracy_torch']:.4f} / {r['accuracy_fp32']:.4f} / {r['accuracy_int8']:.4f} | "
            f"{r['recipe']} | {p1['torch']:.3f} / {p1['ort_fp32']:.3f} / {p1['ort_int8']:.3f} | "
            f"{p32['torch']:.3f} / {p32['ort_fp32']:.3f} / {p32['ort_int8']:.3f} | "
            f"{r['int8_vs_fp32_b1']}x, {r['int8_vs_fp32_b32']}x | "
            f"{r['int8_vs_fp32_ort_defaults_b1']}x, {r['int8_vs_fp32_ort_defaults_b32']}x | "
            f"{r['size_fp32_mb']} → {r['size_int8_mb']} |")
    return lines + [""]


ROLES = {"teacher": "fine-tuned teacher", "student": "distilled student", "pruned": "pruned teacher",
         "qat": "teacher after QAT", "nncf": "NNCF"}


def finetune(record: dict) -> list[str]:
    lines = ["## Fine-tune, distil, prune, quantize: real data shipped with Python and scikit-learn", "",
             f"Machine: {machine(record)}. Command: `python benchmarks/finetune_bench.py`. The text teacher is "
             "pre-trained as a masked LM on the sentences of Python's documentation and its standard library's "
             "docstrings (the judged rows left out), the image teacher starts from random weights; "
             "the text student is the teacher's every other layer, the image "
             "student a ResNet of half the width; the pruned teacher lost half its attention heads and FFN neurons "
             "(a CNN: channels) and recovered by distillation; QAT is one epoch of quantization-aware training from "
             "the fine-tuned teacher. INT8 is what `quantize` chose on the held-out rows (refused: FP32 stays). "
             "p50 interleaved in one process on the held-out rows; the drop against the teacher's FP32 model is "
             "paired (the same rows, counted both ways).", ""]
    for name, task in record["tasks"].items():
        base = task["p50_ms"]["teacher FP32"]["32"]
        models = task["models"]
        trained = ", ".join(f"{ROLES[r]} {m['train_seconds']} s" for r, m in models.items() if "train_seconds" in m)
        lines += [f"### {name}", "", f"{task['train_rows']:,} rows train, {task['test_rows']:,} judge. "
                  f"Training time: {trained}.{pretraining(task)}", "",
                  "| model | params | accuracy [95%] | drop vs teacher FP32 [95%, paired] | p50 ms batch 1 | "
                  "p50 ms batch 32 | vs teacher FP32 at 32 | file MB | recipe "
                  "|", "|---|---|---|---|---|---|---|---|---|"]
        drops = task.get("drop_vs_teacher", {})
        for role, model in models.items():
            if role == "nncf":  # the peer: its INT8 model of the fine-tuned teacher, nothing else
                lines.append(nncf_row(model, task, base))
                continue
            for precision in ("FP32", "INT8"):
                key = f"{role} {precision}"
                label = f"{ROLES.get(role, role)} {precision}"
                if key not in task["p50_ms"]:
                    lines.append(f"| {label} | | refused: {model['refused']} | | | | | | |")
                    continue
                int8 = model["int8"] if precision == "INT8" else None
                score = int8["accuracy"] if int8 else model["fp32_accuracy"]
                size = (int8["size_bytes"] if int8 else model["size_bytes"]) / 1e6
                p50 = task["p50_ms"][key]
                drop = interval(drops[key]) if key in drops else "-"
                lines.append(f"| {label} | {model['params']:,} | {interval(score)} | {drop} | {p50['1']:.3f} | "
                             f"{p50['32']:.3f} | {base / p50['32']:.2f}x | {size:.2f} | "
                             f"{int8['recipe'] if int8 else '-'} |")
        lines += ["", *qat_line(models), ""]
    return lines


def nncf_row(model: dict, task: dict, base: float) -> str:
    p50, drop = task["p50_ms"]["nncf INT8"], task["drop_vs_teacher"].get("nncf INT8")
    return (f"| NNCF INT8 of the teacher (peer) | {model['params']:,} | {interval(model['accuracy'])} | "
            f"{interval(drop)} | {p50['1']:.3f} | {p50['32']:.3f} | {base / p50['32']:.2f}x | "
            f"{model['size_bytes'] / 1e6:.2f} | {model['recipe']} |")


def pretraining(task: dict) -> str:
    """What masked-LM pre-training took and bought, where the task had it."""
    pre, scratch = task.get("pretraining"), task.get("without_pretraining")
    if not pre or not scratch:
        return ""
    return (f" The teacher was pre-trained as a masked LM on {pre['passages']['train']:,} passages in "
            f"{pre['seconds']} s (held-out masked-token accuracy {interval(pre['before'])} before, "
            f"{interval(pre['masked_token_accuracy'])} after); fine-tuned from random init instead it scores "
            f"{interval(scratch['accuracy'])} ({scratch['seconds']} s).")


def qat_line(models: dict) -> list[str]:
    """What post-training INT8 cost the teacher, and what QAT won back, in accuracy points."""
    teacher, aware = models["teacher"], models.get("qat")
    if not aware or not teacher.get("int8") or not aware.get("int8"):
        return []
    lost = teacher["fp32_accuracy"]["value"] - teacher["int8"]["accuracy"]["value"]
    won = aware["int8"]["accuracy"]["value"] - teacher["int8"]["accuracy"]["value"]
    return [f"Post-training INT8 moved the teacher's accuracy by {-lost * 100:+.1f} points; after QAT its INT8 "
            f"model scores {won * 100:+.1f} points against that post-training INT8 model."]


def ceiling(record: dict | None) -> str:
    """The chosen recipe on the model's dominant kernel alone: its speedup, and the model's as a
    fraction of it."""
    if not record or "kernel_speedup" not in record:
        return "-"
    return f"{record['op']} {record['kernel_speedup']:.2f}x; model at {record['fraction_of_ceiling']:.0%} of it"


def hf_models(record: dict) -> list[str]:
    lines = ["## Real-size Hugging Face models: edgepipe quantize beside plain `quantize_dynamic`", "",
             f"Machine: {machine(record)}. Command: `python benchmarks/hf_models.py` (each model built from its "
             "transformers config with random weights; `edgepipe export`, then `edgepipe quantize` on generated "
             f"inputs under its default time budget; then {record['rounds']} interleaved rounds per batch size, "
             "all cores). Plain `quantize_dynamic` is onnxruntime's with S8 weights, per tensor: what most "
             "tutorials run. Fidelity is the relative L2 error of the first output against FP32's on 32 generated "
             "rows (random weights make top-1 agreement a weak signal; `signal` is the share of FP32's output "
             "that varies with the input).", "",
             "| model | parameters | FP32 MB | FP32 p50 ms | recipe chosen | INT8 vs FP32 | "
             "plain quantize_dynamic vs FP32 | kernel ceiling (largest batch) | rel. L2 INT8 / plain | signal | "
             "quantize s | quantize peak MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        if "speedup" not in r:
            step = next((k for k in ("export", "quantize") if r.get(k, {}).get("exit")), "quantize")
            lines.append(f"| {r['model']} | {r.get('parameters', 0) / 1e6:.1f}M | {r.get('fp32_mb', '-')} | "
                         f"- | {step} failed | - | - | - | - | - | - | - |")
            continue
        batches = [str(b) for b in r["batches"]]

        def speedups(key: str) -> str:
            return ", ".join(f"{r['speedup'][b][key]:.2f}x (b{b})" for b in batches)

        fid = r["fidelity"]
        fp32 = ", ".join(f"{r['fp32_p50_ms'][b]:.1f} (b{b})" for b in batches)
        lines.append(f"| {r['model']} | {r['parameters'] / 1e6:.1f}M | {r['fp32_mb']} | {fp32} | {r['chosen']} | "
                     f"{speedups('edgepipe')} | {speedups('plain_dynamic')} | {ceiling(r.get('ceiling'))} | "
                     f"{fid['edgepipe']['rel_l2']:.4f} / {fid['plain_dynamic']['rel_l2']:.4f} | {r['signal']:.3f} | "
                     f"{r['quantize']['seconds']:.0f} | {r['quantize'].get('peak_rss_mb', '-')} |")
    return lines + [""]


RENDERERS = {"byod": byod, "zoo": zoo, "finetune": finetune, "hf_models": hf_models}


def render(results: Path) -> str:
    lines = ["# Benchmarks", "",
             "Generated by `python benchmarks/make_docs.py` from the results files in `benchmarks/results/`; "
             "do not edit by hand. Figures hold for the machine named above each table. "
             "[development.md](development.md) lists every benchmark script.", ""]
    for path in sorted(results.glob("*.json")):
        record = json.loads(path.read_text())
        renderer = RENDERERS.get(record.get("benchmark"))
        if renderer is not None:
            lines += renderer(record)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    args.out.write_text(render(args.results))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
