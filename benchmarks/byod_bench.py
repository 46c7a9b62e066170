"""Your own data, measured: a text classifier fed straight from a CSV and an image classifier
fed straight from an image folder, each quantized with FP32's own score and 95% intervals, and
the peak memory of reading a large CSV.

    python benchmarks/byod_bench.py [--out benchmarks/results] [--work /tmp/byod-bench]

Both models are Hugging Face architectures trained here for a minute with a plain loop (the
point is the data path and the intervals on a trained model, not the training):
- text: a 4-layer BERT (hidden 256) with a WordPiece tokenizer, on generated reviews whose
  label is the sign of one sentiment word among fillers, 10% of the labels flipped;
- images: a small HF ResNet on scikit-learn's handwritten digits written as PNG files, one
  folder per class, read through its ConvNext image processor (resize to 64 px); trained on
  1,400 of them, the other 397 judge (calibration: the training folder).
Writes benchmarks/results/byod.json with the hardware fingerprint and the date.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from byod import LABELS, WORDS, sentences, word_tokenizer, write_csv  # noqa: E402

from edgepipe.data.for_model import DataOptions, file_preprocess, read_for_model  # noqa: E402
from edgepipe.errors import GateFailed  # noqa: E402
from edgepipe.exporters import export  # noqa: E402
from edgepipe.quantize import EvalData, QuantizeConfig, quantize  # noqa: E402
from edgepipe.runtime import fingerprint  # noqa: E402


def train(model: torch.nn.Module, batches, epochs: int, lr: float) -> float:
    """A plain AdamW loop; returns seconds."""
    started = time.perf_counter()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for feeds, labels in batches():
            loss = torch.nn.functional.cross_entropy(model(**feeds).logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    return round(time.perf_counter() - started, 1)


def noisy_reviews(n: int, seed: int) -> list[dict]:
    rows = sentences(n, seed)
    rng = np.random.default_rng(seed + 100)
    for row in rows:
        if rng.random() < 0.1:
            row["label"] = LABELS[1 - LABELS.index(row["label"])]
    return rows


def text_model(work: Path) -> tuple[Path, Path, float]:
    folder = work / "bert"
    word_tokenizer(folder)
    config = transformers.BertConfig(vocab_size=len(WORDS) + 5, hidden_size=256, num_hidden_layers=4,
                                     num_attention_heads=4, intermediate_size=1024, max_position_embeddings=64,
                                     id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    rows = noisy_reviews(2000, seed=1)

    def batches():
        for i in range(0, len(rows), 32):
            part = rows[i:i + 32]
            feeds = tok([r["text"] for r in part], padding=True, return_tensors="pt")
            yield dict(feeds), torch.tensor([LABELS.index(r["label"]) for r in part])

    seconds = train(model, batches, epochs=2, lr=1e-4)
    model.save_pretrained(folder)
    csv = write_csv(work / "reviews.csv", noisy_reviews(3000, seed=2))  # unseen rows: 600 judge, 256 calibrate
    return folder, csv, None, seconds


def image_model(work: Path) -> tuple[Path, Path, Path, float]:
    """Trained on 1,400 of the 1,797 digits; the other 397, as PNG files in class folders, judge."""
    from PIL import Image
    from sklearn.datasets import load_digits

    folder = work / "resnet"
    config = transformers.ResNetConfig(embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1],
                                       num_labels=10, id2label={i: f"digit{i}" for i in range(10)},
                                       label2id={f"digit{i}": i for i in range(10)})
    processor = transformers.ConvNextImageProcessor(size={"shortest_edge": 64}, crop_pct=1.0)
    processor.save_pretrained(folder)
    bunch = load_digits()
    order = np.random.default_rng(0).permutation(len(bunch.target))
    pngs = {}
    for split, rows in (("train", order[:1400]), ("heldout", order[1400:])):
        for i in rows:
            path = work / f"digits-{split}" / f"digit{bunch.target[i]}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((bunch.images[i] * 16).clip(0, 255).astype(np.uint8)).save(path)
            pngs.setdefault(split, []).append((path, int(bunch.target[i])))
    images = [Image.open(p).convert("RGB") for p, _ in pngs["train"]]
    x = torch.from_numpy(processor(images=images, return_tensors="np")["pixel_values"].astype(np.float32))
    y = torch.tensor([label for _, label in pngs["train"]])
    torch.manual_seed(0)
    model = transformers.ResNetForImageClassification(config)

    def batches():
        order = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = order[i:i + 64]
            yield {"pixel_values": x[idx]}, y[idx]

    seconds = train(model, batches, epochs=10, lr=2e-3)
    model.save_pretrained(folder)
    return folder, work / "digits-heldout", work / "digits-train", seconds


def quantize_from(onnx_path: Path, data: Path, out: Path, calibration: Path | None) -> dict:
    """As `edgepipe quantize ONNX --data DATA [--calibration CALIBRATION]` does."""
    pre = file_preprocess(onnx_path)
    named = read_for_model(data, pre, onnx_path, DataOptions(test_fraction=1.0 if calibration else 0.2))
    calib = named.calibration if calibration is None else read_for_model(calibration, pre, onnx_path,
                                                                           DataOptions()).calibration
    try:
        report = quantize(onnx_path, out, QuantizeConfig(), eval_data=EvalData(named.test, named.labels),
                          calibration=EvalData(calib)).report
    except GateFailed as exc:  # a refusal still reports every candidate
        report = exc.report
    return {"data": data.name, "split": named.split, "fp32": {"accuracy": report.fp32.accuracy,
                                                             "scores": report.fp32.scores,
                                                             "p50_ms": report.fp32.p50_ms,
                                                             "size_bytes": report.fp32.size_bytes},
            "candidates": [{k: getattr(c, k) for k in ("recipe", "accuracy", "scores", "accuracy_drop",
                                                        "accuracy_drop_interval", "accuracy_resolution",
                                                        "rows_needed", "speedup", "size_bytes", "verdict")}
                           for c in report.candidates],
            "chosen": report.chosen.recipe if report.chosen else None, "judged_on": report.judged_on}


# VmHWM, not ru_maxrss: on Linux ru_maxrss keeps the high-water mark of the process before exec,
# which for a child of this benchmark is the parent's.
PEAK_CODE = """
import re, sys, time
from pathlib import Path
from edgepipe.data.for_model import DataOptions, file_preprocess, read_for_model
t = time.perf_counter()
named = read_for_model(Path(sys.argv[1]), file_preprocess(sys.argv[2]), sys.argv[2],
                       DataOptions(max_test=int(sys.argv[3])))
seconds = round(time.perf_counter() - t, 2)
peak = int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
print(len(named.labels), seconds, peak)
"""


def peak_memory(work: Path, onnx_path: Path) -> list[dict]:
    """Peak RSS of a fresh process that reads the held-out and calibration rows from a small and
    a large CSV: with the default caps reading stops when they are full; with 100,000 held-out
    rows it reads 500,000 rows and keeps what it judges (memory follows the caps, not the file)."""
    rows = []
    for n, max_test in ((3_000, 1000), (2_000_000, 1000), (2_000_000, 100_000)):
        path = work / f"reviews-{n}.csv"
        if not path.exists():
            write_csv(path, sentences(n, seed=3))
        out = subprocess.run([sys.executable, "-c", PEAK_CODE, str(path), str(onnx_path), str(max_test)],
                             capture_output=True, text=True, check=True).stdout.split()
        rows.append({"rows_in_file": n, "file_mb": round(path.stat().st_size / 1e6, 1), "max_test": max_test,
                     "held_out_rows": int(out[0]), "seconds": float(out[1]), "peak_rss_mb": round(float(out[2]), 1)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--work", type=Path, default=Path("/tmp/byod-bench"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    transformers.utils.logging.set_verbosity_error()
    results = {"benchmark": "byod", "date": dt.date.today().isoformat(), "machine": fingerprint(), "models": {}}
    for name, make in (("text", text_model), ("image", image_model)):
        folder, data, calibration, seconds = make(args.work)
        onnx_path = args.work / f"{name}.onnx"
        export(folder, onnx_path)
        results["models"][name] = {"train_seconds": seconds, **quantize_from(
            onnx_path, data, args.work / f"{name}.int8.onnx", calibration)}
        print(json.dumps(results["models"][name]["fp32"]), results["models"][name]["chosen"], flush=True)
    results["reading"] = peak_memory(args.work, args.work / "text.onnx")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "byod.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {args.out / 'byod.json'}")


if __name__ == "__main__":
    main()
