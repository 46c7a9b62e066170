"""Fine-tune, distil and quantize on real data that ships with Python and scikit-learn, through
edgepipe's own API: accuracy with its 95% interval, p50 at batch 1 and 32, and size, for the
fine-tuned teacher, the distilled student, the teacher pruned to half its heads and FFN neurons
(channels) and recovered by distillation, and the teacher after an epoch of quantization-aware
training, each in FP32 and as the INT8 model quantize chose.

    python benchmarks/finetune_bench.py [--out benchmarks/results] [--work /tmp/finetune-bench]
                                        [--nncf-python VENV/bin/python]

Two tasks, no download:
- text: sentences of Python's own documentation (pydoc_data, shipped with CPython), labelled by
  the family of the topic they come from (statements, expressions, built-in types, classes and
  the data model); a WordPiece tokenizer trained on the training sentences; a 4-layer BERT
  (hidden 256) as the teacher, pre-trained as a masked LM on the documentation's and the standard
  library's docstrings' sentences but the judged ones (and, for comparison, fine-tuned from random
  init), the student its every other layer;
- images: scikit-learn's handwritten digits as PNG files, one folder per class; a ResNet
  (hidden 32-256) as the teacher, a ResNet of half its width as the student.
Each task: `finetune` the teacher, `finetune(..., teacher=...)` the student, `prune_folder` the
teacher, `finetune(..., qat=True)` the teacher; `export` and `quantize` each with the held-out rows
(calibration: the training rows); then every model is timed interleaved in one process on the
held-out rows. Writes
benchmarks/results/finetune.json with the machine and the date.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import re
import shutil
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import transformers

from edgepipe.data.for_model import DataOptions, file_preprocess, read_for_model
from edgepipe.errors import GateFailed
from edgepipe.exporters import export
from edgepipe.metrics import paired_drop, proportion
from edgepipe.models.distil import student_from_teacher
from edgepipe.models.finetune import FinetuneConfig, finetune
from edgepipe.models.mlm import PretrainConfig, pretrain_mlm
from edgepipe.prune.hf import prune_folder
from edgepipe.prune.structured import PruneConfig
from edgepipe.quantize import EvalData, QuantizeConfig, quantize
from edgepipe.runtime import Engine, fingerprint, measure_interleaved

FAMILIES = {
    "statements": ("assert", "break", "continue", "del", "for", "global", "if", "import", "nonlocal", "pass", "raise",
                   "return", "try", "while", "with", "assignment", "augassign", "compound", "exceptions", "async",
                   "await", "yield", "else", "match", "type"),
    "expressions": ("binary", "bitwise", "booleans", "comparisons", "lambda", "calls", "conversions",
                    "atom-identifiers", "atom-literals", "attribute-references", "subscriptions", "slicings", "power",
                    "unary", "shifting", "exprlists", "operator-summary", "in", "integers", "floating",
                    "formatstrings", "strings", "numbers", "imaginary", "id-classes", "identifiers", "naming"),
    "types": ("dict", "sequence-types", "typesseq", "typesseq-mutable", "typesmapping", "typesfunctions",
              "typesmethods", "typesmodules", "string-methods", "specialattrs", "bltin-code-objects",
              "bltin-ellipsis-object", "bltin-null-object", "bltin-type-objects", "truth", "types", "typesseq-range",
              "frame-objects", "numeric-types"),
    "classes": ("class", "customization", "attribute-access", "callable-types", "context-managers", "specialnames",
                "objects", "function", "dynamic-features", "execmodel", "debugger"),
}


def docs_task(work: Path) -> tuple[Path, Path, Path, Path]:
    """(teacher folder, train.csv, test.csv, corpus.txt): a seeded 80/20 split of the documentation's
    labelled sentences, and every topic's sentences but the judged ones for pre-training."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    rows = []
    for label, keys in FAMILIES.items():
        for key in keys:
            for sentence in re.split(r"(?<=[.!?])\s+|\n\n", topics.get(key, "")):
                words = " ".join(sentence.split())
                if 6 <= len(words.split()) <= 40:
                    rows.append({"text": words, "label": label})
    test = np.random.default_rng(0).random(len(rows)) < 0.2
    paths = {}
    for name, keep in (("train", ~test), ("test", test)):
        paths[name] = work / f"docs-{name}.csv"
        with paths[name].open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(r for r, k in zip(rows, keep) if k)
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator([r["text"] for r, k in zip(rows, ~test) if k],
                            trainers.WordPieceTrainer(vocab_size=4000, special_tokens=["[PAD]", "[UNK]", "[CLS]",
                                                                                       "[SEP]", "[MASK]"]))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    folder = work / "docs-teacher"
    torch.manual_seed(0)  # the same random init on every run
    transformers.BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=64).save_pretrained(folder)
    labels = list(FAMILIES)
    transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=1024, max_position_embeddings=64, id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)})).save_pretrained(folder)
    held_out = {r["text"] for r, k in zip(rows, test) if k}
    corpus = sorted({c for c in (*_sentences(topics.values()), *_sentences(stdlib_docstrings())) if c not in held_out})
    paths["corpus"] = work / "docs-corpus.txt"  # the judged sentences left out
    paths["corpus"].write_text("\n".join(np.random.default_rng(0).permutation(corpus)))
    return folder, paths["train"], paths["test"], paths["corpus"]


def _sentences(texts) -> list[str]:
    found = (" ".join(s.split()) for text in texts for s in re.split(r"(?<=[.!?])\s+|\n\n", text))
    return [s for s in found if 4 <= len(s.split()) <= 60]


def stdlib_docstrings() -> list[str]:
    """Every docstring of the standard library's modules, classes and functions (tests left out)."""
    import ast
    import sysconfig

    docs = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if {"test", "tests", "idle_test", "site-packages"} & set(path.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        docs += [ast.get_docstring(node) or "" for node in ast.walk(tree) if isinstance(
            node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    return docs


def digits_task(work: Path) -> tuple[Path, Path, Path, Path]:
    """(teacher folder, student folder, train images, test images)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    test = np.random.default_rng(0).random(len(bunch.target)) < 0.2
    for i, (image, label) in enumerate(zip(bunch.images, bunch.target)):
        path = work / f"digits-{'test' if test[i] else 'train'}" / f"digit{label}" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 16).clip(0, 255).astype(np.uint8)).save(path)
    folders = []
    torch.manual_seed(0)
    for name, widths in (("digits-teacher", [32, 64, 128, 256]), ("digits-student", [16, 32, 64, 128])):
        folder = work / name
        config = transformers.ResNetConfig(embedding_size=widths[0], hidden_sizes=widths, depths=[1, 1, 1, 1],
                                           num_labels=10, id2label={i: f"digit{i}" for i in range(10)},
                                           label2id={f"digit{i}": i for i in range(10)})
        transformers.ResNetForImageClassification(config).save_pretrained(folder)
        transformers.ConvNextImageProcessor(size={"shortest_edge": 64}, crop_pct=1.0).save_pretrained(folder)
        folders.append(folder)
    return folders[0], folders[1], work / "digits-train", work / "digits-test"


def quantized(onnx_path: Path, test: Path, train: Path, out: Path) -> dict:
    pre = file_preprocess(onnx_path)
    named = read_for_model(test, pre, onnx_path, DataOptions(test_fraction=1.0, max_test=5000))
    calibration = read_for_model(train, pre, onnx_path, DataOptions(test_fraction=1.0, max_test=256)).test
    try:
        result = quantize(onnx_path, out, QuantizeConfig(), eval_data=EvalData(named.test, named.labels),
                          calibration=EvalData(calibration))
        report, path = result.report, out
    except GateFailed as exc:
        report, path = exc.report, None
    chosen = report.chosen
    return {"fp32_accuracy": report.fp32.scores["accuracy"], "rows": len(named.labels),
            "int8": None if chosen is None else {"recipe": chosen.recipe, "accuracy": chosen.scores["accuracy"],
                                                 "drop": chosen.accuracy_drop_interval, "path": str(path),
                                                 "size_bytes": report.size_bytes},
            "refused": None if chosen else report.candidates[0].verdict, "feeds": named.test,
            "labels": named.labels}


def engine(name: str, path: Path) -> Engine:
    """NNCF's model runs where NNCF means it to, in OpenVINO; edgepipe's as quantize deployed it."""
    return Engine(path, providers="cpu", backend="openvino" if name.startswith("nncf") else None)


def timings(models: dict[str, Path], feeds: dict[str, np.ndarray]) -> dict[str, dict[int, float]]:
    """p50 ms per model at batch 1 and 32, interleaved in this process."""
    engines = {name: engine(name, path) for name, path in models.items()}
    out: dict[str, dict[int, float]] = {name: {} for name in models}
    for batch in (1, 32):
        batch_feeds = {k: np.ascontiguousarray(v[:batch]) for k, v in feeds.items()}
        stats = measure_interleaved({n: (lambda e=e: e.run(batch_feeds)) for n, e in engines.items()}, batch,
                                    rounds=20)
        for name, s in stats.items():
            out[name][batch] = round(s.p50_ms, 3)
    return out


def _pruned(name: str, train: Path, test: Path, work: Path, config: FinetuneConfig):
    """Half the teacher's heads and FFN neurons (channels of a CNN), recovered by distillation."""
    report = prune_folder(work / f"{name}-tuned", train, work / f"{name}-pruned",
                          PruneConfig(ratio=0.5, steps=1, finetune_epochs=config.epochs, batch_sizes=(32,)),
                          eval_data=test, recovery=config, log=print).report
    return report.accuracy_intervals["after"], report.params_after, report.seconds


def against_teacher(models: dict[str, Path], feeds: dict[str, np.ndarray], labels: np.ndarray):
    """({model: its accuracy drop against the teacher's FP32 model on the same held-out rows, with
    its paired 95% interval (rows one gets right and the other wrong, counted both ways)},
    {model: its accuracy with its interval})."""
    right = {}
    for name, path in models.items():
        runner = engine(name, path)
        logits = np.concatenate([next(iter(runner.run({k: v[i:i + 64] for k, v in feeds.items()}).values()))
                                 for i in range(0, len(labels), 64)])
        right[name] = logits.argmax(-1) == labels
    base = right["teacher FP32"]
    drops = {name: paired_drop(int((base & ~r).sum()), int((~base & r).sum()), len(labels)).to_dict()
             for name, r in right.items() if name != "teacher FP32"}
    return drops, {name: proportion(int(r.sum()), len(labels)).to_dict() for name, r in right.items()}


def nncf_model(fp32: Path, train: Path, test: Path, python: str) -> tuple[dict, Path]:
    """NNCF's accuracy-controlled INT8 model of the FP32 file (max drop 0.01 on the held-out rows,
    calibrated on up to 300 training rows), made in NNCF's own environment."""
    pre = file_preprocess(fp32)
    held = read_for_model(test, pre, fp32, DataOptions(test_fraction=1.0, max_test=5000))
    calibration = read_for_model(train, pre, fp32, DataOptions(test_fraction=1.0, max_test=300)).test
    calib, rows, out = fp32.with_suffix(".calib.npz"), fp32.with_suffix(".eval.npz"), fp32.with_suffix(".nncf.onnx")
    np.savez(calib, **calibration)
    np.savez(rows, **held.test, labels=held.labels)
    script = Path(__file__).resolve().parent / "peers" / "nncf_accuracy_control.py"
    done = subprocess.run([python, str(script), str(fp32), str(out), str(calib), str(rows), "0.01"],
                          capture_output=True, text=True, check=True)
    seconds = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
    return {"recipe": "NNCF accuracy control (max drop 0.01), OpenVINO", "size_bytes": out.stat().st_size,
            "seconds": seconds}, out


def run_task(name: str, teacher: Path, student: Path | None, train: Path, test: Path, work: Path,
             config: FinetuneConfig, nncf_python: str | None = None) -> dict:
    started = time.perf_counter()
    tuned = finetune(teacher, train, work / f"{name}-tuned", config, eval_data=test, progress=print).report
    trained = {"teacher": (f"{name}-tuned", tuned.eval_accuracy, tuned.params, time.perf_counter() - started)}
    if student is None:
        student = student_from_teacher(work / f"{name}-tuned", work / f"{name}-cut", keep_every=2)
    started = time.perf_counter()
    distilled = finetune(student, train, work / f"{name}-distilled", config, eval_data=test,
                         teacher=work / f"{name}-tuned", progress=print).report
    trained["student"] = (f"{name}-distilled", distilled.eval_accuracy, distilled.params,
                          time.perf_counter() - started)
    trained["pruned"] = (f"{name}-pruned", *_pruned(name, train, test, work, config))
    started = time.perf_counter()  # QAT: one epoch from the fine-tuned teacher at a tenth of its rate
    aware = finetune(work / f"{name}-tuned", train, work / f"{name}-qat", replace(
        config, epochs=1, lr=config.lr / 10, qat=True), eval_data=test, progress=print).report
    trained["qat"] = (f"{name}-qat", aware.eval_accuracy, aware.params, time.perf_counter() - started)
    rows, files = {}, {}
    for role, (folder, accuracy, params, seconds) in trained.items():
        onnx_path = work / f"{folder}.onnx"
        export(work / folder, onnx_path)
        q = quantized(onnx_path, test, train, work / f"{folder}.int8.onnx")
        files[f"{role} FP32"] = onnx_path
        if q["int8"]:
            files[f"{role} INT8"] = Path(q["int8"].pop("path"))
        feeds, labels = q.pop("feeds"), q.pop("labels")
        rows[role] = {"params": params, "train_seconds": round(seconds, 1), "finetune_accuracy": accuracy,
                      "size_bytes": onnx_path.stat().st_size, **q}
    rows["teacher"]["epochs"], rows["student"]["epochs"] = len(tuned.epochs), len(distilled.epochs)
    if nncf_python:  # the peer, on the fine-tuned teacher's FP32 file and the same rows
        rows["nncf"], files["nncf INT8"] = nncf_model(files["teacher FP32"], train, test, nncf_python)
        rows["nncf"]["params"] = rows["teacher"]["params"]
    p50 = timings(files, feeds)
    drops, scores = against_teacher(files, feeds, labels)
    if nncf_python:
        rows["nncf"]["accuracy"] = scores["nncf INT8"]
    return {"train_rows": tuned.rows["train"], "test_rows": tuned.rows["eval"], "models": rows,
            "p50_ms": {k: {str(b): v for b, v in t.items()} for k, t in p50.items()}, "drop_vs_teacher": drops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--work", type=Path, default=Path("/tmp/finetune-bench"))
    parser.add_argument("--nncf-python", default=None,
                        help="python of a venv with nncf + openvino: add NNCF's accuracy-controlled INT8 beside")
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)  # every model is trained afresh
    args.work.mkdir(parents=True)
    transformers.utils.logging.set_verbosity_error()
    results = {"benchmark": "finetune", "date": dt.date.today().isoformat(), "machine": fingerprint(), "tasks": {}}
    teacher, train, test, corpus = docs_task(args.work)
    config = FinetuneConfig(epochs=4, lr=3e-4, batch_size=32)
    scratch = finetune(teacher, train, args.work / "docs-scratch", config, eval_data=test, progress=print).report
    pretrained = pretrain_mlm(teacher, corpus, args.work / "docs-pretrained", PretrainConfig(
        epochs=3, lr=1e-3, batch_size=32, max_length=64), progress=print).report
    task = run_task("docs", args.work / "docs-pretrained", None, train, test, args.work, config, args.nncf_python)
    task["pretraining"] = {"passages": pretrained.rows, "seconds": pretrained.train_seconds,
                           "masked_token_accuracy": pretrained.eval_accuracy,
                           "before": pretrained.eval_accuracy_before}
    task["without_pretraining"] = {"accuracy": scratch.eval_accuracy, "seconds": scratch.train_seconds}
    results["tasks"]["Python docs sentences, 4 topic families (BERT 4x256)"] = task
    teacher, student, train, test = digits_task(args.work)
    results["tasks"]["handwritten digits, 10 classes (ResNet)"] = run_task(
        "digits", teacher, student, train, test, args.work, FinetuneConfig(epochs=6, lr=2e-3, batch_size=32),
        args.nncf_python)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "finetune.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {args.out / 'finetune.json'}")


if __name__ == "__main__":
    main()
