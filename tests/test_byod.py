"""Bring your own data, end to end on tiny Hugging Face classifiers (random weights): export
carries the tokenizer or image processor, then quantize, compare, run and serve take CSV, JSONL,
Parquet, save_to_disk and image folders, and serve answers text with label names."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from byod import (
    LABELS,
    digit_folder,
    image_classifier,
    sentences,
    text_classifier,
    write_csv,
    write_jsonl,
)

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")
QUICK = ("--mode", "dynamic", "--no-tune-session", "--batch", "4", "--time-budget", "10")
QUICK_CNN = ("--mode", "static", *QUICK[2:])  # dynamic recipes do not apply to Conv


def _export(cli, folder, out):
    result = cli("export", folder, "-o", out, "--exporter", "torchscript")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    from typer.testing import CliRunner

    from edgepipe.cli import app

    root = tmp_path_factory.mktemp("text")
    folder = text_classifier(root / "bert")
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(folder), "-o", str(root / "bert.onnx"), "--exporter", "torchscript"])
    assert result.exit_code == 0, result.output
    return folder, root / "bert.onnx"


def _record(result, path):
    assert result.exit_code in (0, 1), result.output  # 1: no candidate beat FP32 on this tiny model
    assert "Traceback" not in result.output
    return json.loads(path.read_text())


def _fp32_accuracy(onnx_path, folder, rows):
    """FP32's accuracy computed independently: transformers' tokenizer and onnxruntime."""
    import onnxruntime as ort

    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    feeds = dict(tok([r["text"] for r in rows], padding=True, return_tensors="np"))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    logits = session.run(None, {n: feeds[n].astype(np.int64) for n in names})[0]
    return float((logits.argmax(-1) == [LABELS.index(r["label"]) for r in rows]).mean())


def test_quantize_judges_a_datasets_test_split_through_the_models_own_tokenizer(tmp_path, cli, text_model):
    datasets = pytest.importorskip("datasets")
    folder, onnx_path = text_model
    test = sentences(120, seed=5)
    saved = tmp_path / "reviews"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(sentences(200, seed=6)),
                          "test": datasets.Dataset.from_list(test)}).save_to_disk(str(saved))
    out = tmp_path / "record.json"
    record = _record(cli("quantize", onnx_path, "-o", tmp_path / "q.onnx", "--data", saved, *QUICK,
                         "--json", out), out)
    fp32 = record["fp32"]
    assert fp32["accuracy"] == pytest.approx(_fp32_accuracy(onnx_path, folder, test))
    acc = fp32["scores"]["accuracy"]
    assert acc["low"] <= fp32["accuracy"] <= acc["high"] and acc["high"] - acc["low"] > 0.05  # 120 rows
    assert "macro_f1" in fp32["scores"]
    built = [c for c in record["candidates"] if c["error"] is None]
    assert built and all(c["accuracy_drop_interval"]["low"] <= c["accuracy_drop"] <= c["accuracy_drop_interval"]["high"]
                         and c["accuracy_resolution"] in ("within", "over", "unresolved") for c in built)


def write_rows(tmp_path, fmt: str, rows: list[dict]):
    """`rows` as a user would bring them: (path, flags naming the columns when they are unusual)."""
    if fmt == "csv":  # column names a user chose, named by flags
        data = write_csv(tmp_path / "d.csv", rows, {"text": "review", "label": "sentiment"})
        return data, ("--input-column", "review", "--label-column", "sentiment")
    if fmt == "jsonl":
        return write_jsonl(tmp_path / "d.jsonl", rows), ()
    if fmt == "parquet":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
        return tmp_path / "d.parquet", ()
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    return tmp_path / "saved", ()


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet", "saved"])
def test_quantize_and_compare_take_tables(tmp_path, cli, text_model, fmt):
    folder, onnx_path = text_model
    data, flags = write_rows(tmp_path, fmt, sentences(300, seed=7))
    out = tmp_path / "record.json"
    result = cli("quantize", onnx_path, "-o", tmp_path / "q.onnx", "--data", data, *flags, *QUICK, "--json", out)
    record = _record(result, out)
    assert "scores (95% interval): FP32 accuracy" in result.output
    assert "held-out rows" in record["judged_on"]
    assert record["fp32"]["scores"]["accuracy"]["value"] == record["fp32"]["accuracy"]
    assert "judge" in result.output  # the split is said
    if (tmp_path / "q.onnx").exists():  # shipped: the INT8 file carries the tokenizer too
        compared = cli("compare", onnx_path, tmp_path / "q.onnx", "--data", data, *flags[:2], "--min-top1", "0.5")
        assert compared.exit_code == 0, compared.output
    compared = cli("compare", onnx_path, onnx_path, "--data", data, *flags[:2])
    assert compared.exit_code == 0 and "parity ok" in compared.output, compared.output


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet", "saved"])
def test_a_pipeline_runs_a_folder_on_the_users_rows(tmp_path, text_model, fmt):
    folder, _ = text_model
    data, _ = write_rows(tmp_path, fmt, sentences(200, seed=8))
    if fmt == "csv":  # a pipeline finds the columns by their usual names
        data = write_csv(tmp_path / "reviews.csv", sentences(200, seed=8))
    (tmp_path / "run.toml").write_text(
        f'stages = ["export", "quantize"]\nout_dir = "out"\n[export]\nexporters = ["torchscript"]\n'
        f'[quantize]\nmode = "dynamic"\ntune_session = false\nbatch_sizes = [4]\n'
        f'[[models]]\nname = "reviews"\nsource = "{folder}"\ndataset = "{data.name}"\n')
    proc = subprocess.run([sys.executable, "-m", "edgepipe", "run", str(tmp_path / "run.toml")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode in (0, 1), proc.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    model = manifest["models"]["reviews"]
    assert f"split of the first 200 rows of {data.name}" in model["data"]["split"]
    quantize = model["stages"]["quantize"]["record"]
    assert quantize["fp32"]["scores"]["accuracy"]["low"] <= quantize["fp32"]["accuracy"]


def test_an_image_folder_goes_through_the_models_image_processor(tmp_path, cli):
    folder = image_classifier(tmp_path / "resnet")
    onnx_path = _export(cli, folder, tmp_path / "resnet.onnx")
    images = digit_folder(tmp_path / "digits", per_class=12)
    out = tmp_path / "record.json"
    record = _record(cli("quantize", onnx_path, "-o", tmp_path / "q.onnx", "--data", images, *QUICK_CNN,
                         "--json", out), out)
    assert record["fp32"]["scores"]["accuracy"]["high"] > record["fp32"]["scores"]["accuracy"]["low"]
    # the pixels are what the folder's own image processor makes of the file
    from PIL import Image

    from edgepipe.data.for_model import file_preprocess
    from edgepipe.data.labelled import Columns, RowEncoder

    encoder = RowEncoder(file_preprocess(onnx_path), Columns(("image",), "label"), images)
    ours = encoder.encode([{"image": images / "digit3" / "1.png", "label": "digit3"}])[0]
    processor = transformers.AutoImageProcessor.from_pretrained(str(folder), use_fast=False)
    theirs = processor(images=[Image.open(images / "digit3" / "1.png").convert("RGB")], return_tensors="np")
    np.testing.assert_allclose(ours, theirs["pixel_values"][0], atol=1e-6)
    compared = cli("compare", onnx_path, onnx_path, "--data", images)
    assert compared.exit_code == 0 and "parity ok" in compared.output, compared.output
    (tmp_path / "run.toml").write_text(
        'stages = ["export", "quantize"]\nout_dir = "out"\n[export]\nexporters = ["torchscript"]\n'
        '[quantize]\nmode = "static"\ntune_session = false\nbatch_sizes = [4]\n'
        '[[models]]\nname = "digits"\nsource = "resnet"\ndataset = "digits"\n')
    proc = subprocess.run([sys.executable, "-m", "edgepipe", "run", str(tmp_path / "run.toml")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode in (0, 1), proc.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert "rows of digits" in manifest["models"]["digits"]["data"]["split"]


@pytest.mark.parametrize("case, message", [
    ("missing column", "has no column 'review'; its columns are text, label"),
    ("unknown label", "label 'neutral' is not one of the model's labels (negative, positive)"),
    ("empty", "has no rows"),
    ("no tokenizer", "carries no tokenizer or image processor"),
    ("bad image", "cannot read image"),
])
def test_bad_data_is_one_line_exit_2_and_writes_nothing(tmp_path, cli, text_model, case, message):
    _, onnx_path = text_model
    flags: tuple = ()
    if case == "missing column":
        data, flags = write_csv(tmp_path / "d.csv", sentences(20)), ("--input-column", "review")
    elif case == "unknown label":
        data = write_csv(tmp_path / "d.csv", sentences(20) + [{"text": "fine", "label": "neutral"}])
    elif case == "empty":
        data = tmp_path / "d.csv"
        data.write_text("text,label\n")
    elif case == "no tokenizer":
        folder = text_classifier(tmp_path / "bare", tokenizer=False)
        onnx_path = _export(cli, folder, tmp_path / "bare.onnx")
        data = write_csv(tmp_path / "d.csv", sentences(20))
    else:
        folder = image_classifier(tmp_path / "resnet")
        onnx_path = _export(cli, folder, tmp_path / "resnet.onnx")
        data = digit_folder(tmp_path / "digits", per_class=2)
        (data / "digit0" / "broken.png").write_bytes(b"not an image")
    target = tmp_path / "new" / "q.onnx"
    result = cli("quantize", onnx_path, "-o", target, "--data", data, *flags,
                 *(QUICK_CNN if case == "bad image" else QUICK))
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()[-1]) < 400 and not (tmp_path / "new").exists()


def test_rows_longer_than_the_positions_are_cut_and_said(tmp_path, cli):
    folder = text_classifier(tmp_path / "short", positions=12)
    onnx_path = _export(cli, folder, tmp_path / "short.onnx")
    rows = sentences(40) + [{"text": "good " * 30, "label": "positive"} for _ in range(10)]
    result = cli("compare", onnx_path, onnx_path, "--data", write_csv(tmp_path / "d.csv", rows))
    assert result.exit_code == 0, result.output  # not onnxruntime's error about position ids
    assert "rows were longer than the model's 12 positions and were cut" in result.output


def test_serve_answers_text_with_label_names(text_model):
    import httpx
    from loopback import LoopbackServer

    from edgepipe.runtime import Engine
    from edgepipe.runtime.preprocess import TextClassifier
    from edgepipe.serve.app import create_app

    _, onnx_path = text_model
    engine = Engine(onnx_path)
    direct = TextClassifier(engine)(["good film", "awful plot"], ["great", "bad"])
    with LoopbackServer(create_app(engine, max_delay_ms=2)) as server:
        one = httpx.post(f"{server.url}/v1/predict", json={"text": "good film", "text_pair": "great"}).json()
        many = httpx.post(f"{server.url}/v1/predict",
                          json={"text": ["good film", "awful plot"], "text_pair": ["great", "bad"]}).json()
        bad = httpx.post(f"{server.url}/v1/predict", json={"text": ["a", 3]})
    assert one["label"] in LABELS and 0.5 <= one["score"] <= 1
    assert many["labels"] == direct and one == direct[0]
    assert bad.status_code == 422 and "must be a string or a non-empty list" in bad.json()["error"]


def test_text_classification_on_the_device_needs_no_torch(text_model):
    _, onnx_path = text_model
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "from edgepipe.runtime import Engine, TextClassifier\n"
            f"print(TextClassifier(Engine({str(onnx_path)!r}))(['good film'])[0]['label'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() in LABELS


def test_export_checks_parity_on_rows_through_the_folders_tokenizer(tmp_path, cli, text_model):
    folder, _ = text_model
    data = write_csv(tmp_path / "d.csv", sentences(50))
    result = cli("export", folder, "-o", tmp_path / "m.onnx", "--exporter", "torchscript", "--data", data)
    assert result.exit_code == 0, result.output
    assert "real held-out inputs" in result.output
