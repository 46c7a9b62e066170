"""Real-size Hugging Face models through edgepipe, beside plain onnxruntime `quantize_dynamic`.

    python benchmarks/hf_models.py [--models resnet50,mobilenetv2,vit-base,bert-base,distilbert,zoo]
                                   [--batch 1,8] [--time-budget 40] [--nncf-python VENV/bin/python]
                                   [--optimum-python VENV/bin/python] [--olive-python VENV/bin/python]

Each model is built offline from its transformers config with random weights (nothing is
downloaded) and saved with save_pretrained; then, each step in its own process so its wall time
and peak RSS are its own: `edgepipe export FOLDER` and `edgepipe quantize` (generated inputs:
judged by top-1 agreement with FP32). Then, in this process, FP32, edgepipe's INT8 and plain
`quantize_dynamic` (S8 weights, per-tensor, full range: what most tutorials run), and, with
OpenVINO installed, edgepipe's INT8 file run by OpenVINO (when quantize did not choose it) are timed
interleaved at each batch size with all cores, beside OpenVINO + NNCF's INT8 model on OpenVINO
when --nncf-python names a venv with nncf (peers never enter edgepipe's environment), and their
outputs compared with FP32's (relative L2 error, cosine) on generated inputs. Random weights make
top-1 agreement a weak signal, so fidelity is the figure to read, and each row's `signal` (the
share of FP32's logits that varies with the input) says whether it can be read. --optimum-python
(a venv with optimum-onnx) also runs Optimum's dynamic INT8 quantize in its own process, for the
ratio of the two tools' wall times.
--olive-python (a venv with olive-ai) adds Olive's dynamic and static INT8 models (default
settings, static calibrated on the rows NNCF gets), timed and compared like the others.
`zoo` (or zoo-mlp, zoo-cnn, zoo-lstm, zoo-transformer) adds the reference zoo, trained here on
its bundled dataset (`edgepipe train`, its own process) and exported from the checkpoint: every
tool calibrates on the same 300 training rows, all models are timed and compared on held-out
rows, and each one's held-out accuracy is reported beside its fidelity (default batches 1,32).
Writes benchmarks/results/hf_models.json (with the machine's fingerprint and the date), a row per
model, after each model; rows an earlier run on the same CPU wrote for other models are kept.
docs/benchmarks.md renders it (benchmarks/make_docs.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from steps import run_step  # noqa: E402

MODELS = {  # name -> (transformers class, config class, config kwargs)
    "resnet50": ("ResNetForImageClassification", "ResNetConfig", {}),
    "mobilenetv2": ("MobileNetV2ForImageClassification", "MobileNetV2Config", {}),
    "vit-base": ("ViTForImageClassification", "ViTConfig", {}),
    "bert-base": ("BertForSequenceClassification", "BertConfig", {"num_labels": 2}),
    "distilbert": ("DistilBertForSequenceClassification", "DistilBertConfig", {"num_labels": 2}),
}


ZOO = ("mlp", "cnn", "lstm", "transformer")  # zoo-<name>: trained here, judged on held-out rows
ZOO_CALIBRATION_ROWS = 300
# Generated rows the HF models' fidelity is measured on (seeded apart from every tool's calibration
# rows; random-weight logits differ little between rows, so 8 read a gap of 6% that moved with
# rounding)
FIDELITY_ROWS = 32  # NNCF's default subset size; every tool gets the same rows


def train_zoo(name: str, work: Path) -> tuple[dict, Path, dict]:
    """Train zoo model `name` (zoo-mlp ...) on its bundled dataset in its own process; write the
    calibration rows where calibration_rows() looks for them, and return the step (with the
    parameter count training recorded), the checkpoint and the held-out split ({input: rows,
    "y": labels})."""
    import numpy as np

    from edgepipe.models import load_checkpoint, load_dataset
    from edgepipe.models.zoo import DEFAULT_DATASET

    zoo_name = name.removeprefix("zoo-")
    data = load_dataset(DEFAULT_DATASET[zoo_name])  # seed 0: the split `edgepipe train` holds out
    step = run_step(["train", "-m", zoo_name, "-o", str(work / name)])
    np.savez(work / f"{name}.calib.npz", **{data.input_name: data.x_train[:ZOO_CALIBRATION_ROWS]})
    heldout = {data.input_name: data.x_test, "y": data.y_test}
    np.savez(work / f"{name}.heldout.npz", **heldout)
    checkpoint = work / name / "checkpoint.pt"
    if step["exit"] == 0:
        step["parameters"] = load_checkpoint(checkpoint)[1]["metrics"]["params"]
    return step, checkpoint, heldout


def calibrate_batchnorm(model, image_size: int, passes: int = 4, scale: float = 0.85) -> None:
    """Give an untrained CNN a trained one's activation scale: BatchNorm statistics from random
    images, as training would set them, and each BatchNorm's scale at `scale`.

    Hugging Face draws an untrained MobileNetV2's convolutions at std 0.02 with unit running
    variance: its activations shrink layer by layer to logits of about 1e-22 (below FP16's
    smallest number), and comparing a quantized model's logits with FP32's then measures
    nothing. Measured on 16 standard-normal images:
    - at scale 0.5 (this benchmark before) its logits were one constant (their spread over the
      images 1e-7 of their size), so its fidelity figures compared how each tool rounds that
      constant;
    - at 1.0 it is chaotic (weights each moved by at most 2^-9 of themselves move its logits by
      23%);
    - at 0.9 its two logits cross on some images, and every INT8 recipe edgepipe built flipped
      6-15 of 96 generated rows: a random head's coin flips, not a measure of any tool;
    - at 0.85 the logits spread by 3-6% of their size, the same class wins on every image, and
      that weight noise moves them by 1.1%: an error INT8 makes is measured against a signal that
      is there (the `signal` figure of each row).
    """
    import torch

    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a plain average over the passes
    model.train()
    with torch.no_grad():
        for _ in range(passes):
            model(torch.randn(8, 3, image_size, image_size))
        for norm in norms:
            norm.weight.fill_(scale)
    model.eval()


def save_model(name: str, folder: Path) -> int:
    import torch
    import transformers

    torch.manual_seed(0)
    model_cls, config_cls, kwargs = MODELS[name]
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs))
    size = getattr(model.config, "image_size", None)
    if size and any(type(m).__name__ == "BatchNorm2d" for m in model.modules()):
        calibrate_batchnorm(model, size)  # MobileNetV2 (ResNetConfig has no image size: its own init)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def compare(fp32: Path, int8: Path, plain: Path, batches: list[int], rounds: int, backend: str,
            peers: dict[str, tuple[Path, str]] | None = None, heldout: dict | None = None) -> dict:
    """FP32, edgepipe's INT8 on the backend quantize chose, plain quantize_dynamic, (when
    OpenVINO is installed and was not chosen) edgepipe's INT8 file run by OpenVINO, and each
    peer's model (name -> (file, the runtime it is made for)). With `heldout` (inputs and "y"),
    timing and fidelity use its rows and each model's accuracy on them is reported too."""
    import numpy as np

    from edgepipe.quantize.evaluation import fidelity
    from edgepipe.runtime import Engine, measure_interleaved
    from edgepipe.runtime.openvino_backend import available
    from edgepipe.runtime.spec import make_feeds

    # no spinning workers: several sessions share 2 cores, and one's spinning slows the next
    engines = {"fp32": Engine(fp32, spinning=False), "edgepipe": Engine(int8, backend=backend, spinning=False),
               "plain_dynamic": Engine(plain, spinning=False)}
    if available() and backend != "openvino":
        engines["edgepipe_file_on_openvino"] = Engine(int8, backend="openvino")
    for key, (path, runtime) in (peers or {}).items():  # a peer's model, on the runtime it is made for
        if path.exists():
            engines[key] = Engine(path, backend=runtime, spinning=False)
    out: dict = {"speedup": {}, "fidelity": {}}
    inputs = {k: v for k, v in (heldout or {}).items() if k != "y"}

    def rows(batch: int, seed: int) -> dict:
        if not inputs:
            return make_feeds(engines["fp32"].inputs, batch=batch, seed=seed)
        return {k: np.resize(v, (batch, *v.shape[1:])) for k, v in inputs.items()}

    for batch in batches:
        feeds = rows(batch, seed=3)
        stats = measure_interleaved({k: e.runner(feeds) for k, e in engines.items()}, batch, rounds=rounds)
        out["speedup"][batch] = {k: round(stats["fp32"].p50_ms / s.p50_ms, 3) for k, s in stats.items() if k != "fp32"}
        out.setdefault("fp32_p50_ms", {})[batch] = round(stats["fp32"].p50_ms, 3)
    feeds = inputs or make_feeds(engines["fp32"].inputs, batch=FIDELITY_ROWS, seed=4)
    got = {key: engine.run(feeds)[engine.output_names[0]] for key, engine in engines.items()}
    # how much of FP32's output depends on the input: near 0, fidelity compares rounded constants
    ref = got["fp32"].astype(np.float64)
    out["signal"] = round(float(np.linalg.norm(ref - ref.mean(axis=0)) / max(np.linalg.norm(ref), 1e-30)), 5)
    out["agreement"] = {k: round(float(np.mean(v.argmax(-1) == ref.argmax(-1))), 4)
                        for k, v in got.items() if k != "fp32"}
    for key in [k for k in engines if k != "fp32"]:
        out["fidelity"][key] = {k: round(v, 5) for k, v in fidelity(got[key], got["fp32"]).items()}
    if heldout:
        out["accuracy"] = {k: round(float(np.mean(v.argmax(-1) == heldout["y"])), 4) for k, v in got.items()}
        out["heldout_rows"] = len(heldout["y"])
    return out


def calibration_rows(onnx_path: Path, work: Path) -> Path:
    """64 generated rows for the peers that calibrate (NNCF, Olive's static), the same for both."""
    import numpy as np

    from edgepipe.runtime import Engine
    from edgepipe.runtime.spec import make_feeds

    calib = work / f"{onnx_path.stem}.calib.npz"
    if not calib.exists():
        np.savez(calib, **make_feeds(Engine(onnx_path).inputs, batch=64, seed=5))
    return calib


def olive_step(onnx_path: Path, work: Path, python: str, mode: str) -> tuple[dict, Path | None]:
    """Olive's dynamic or static INT8 quantization (one workflow, one pass) in its own environment."""
    script = Path(__file__).resolve().parent / "peers" / "olive_quantize.py"
    out = work / f"{onnx_path.stem}.olive-{mode}"
    step = run_step([str(script), str(onnx_path), str(out), mode, str(calibration_rows(onnx_path, work))],
                    python=python)
    printed = [line for line in step["tail"] if line.startswith("{")]
    model = Path(json.loads(printed[-1])["model"]) if step["exit"] == 0 and printed else None
    return step, model


def nncf_step(onnx_path: Path, work: Path, python: str) -> tuple[dict, Path]:
    """OpenVINO + NNCF's post-training quantization in its own environment, on 64 generated rows."""
    calib, out = calibration_rows(onnx_path, work), work / f"{onnx_path.stem}.nncf.onnx"
    script = Path(__file__).resolve().parent / "peers" / "nncf_quantize.py"
    return run_step([str(script), str(onnx_path), str(out), str(calib)], python=python), out


def optimum_step(onnx_path: Path, work: Path, python: str) -> dict:
    """Optimum's dynamic INT8 (AutoQuantizationConfig.avx2) in its own environment and process:
    the wall time a user of optimum-onnx waits, to hold edgepipe's quantize against."""
    script = Path(__file__).resolve().parent / "peers" / "optimum_quantize.py"
    return run_step([str(script), str(onnx_path), str(work / f"{onnx_path.stem}.optimum")], python=python)


def bench(name: str, work: Path, batches: list[int], time_budget: float | None, rounds: int,
          nncf_python: str | None = None, optimum_python: str | None = None, olive_python: str | None = None) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    folder, heldout, row = work / name, None, {"model": name, "batches": batches}
    if name.startswith("zoo-"):
        row["train"], folder, heldout = train_zoo(name, work)
        if row["train"]["exit"] != 0:
            return row
        row["parameters"] = row["train"].pop("parameters")
    else:
        row["parameters"] = save_model(name, folder)
    onnx_path, int8, plain = work / f"{name}.onnx", work / f"{name}.int8.onnx", work / f"{name}.plain.onnx"
    row["export"] = run_step(["export", str(folder), "-o", str(onnx_path), "--json", str(work / f"{name}.export.json")])
    if row["export"]["exit"] != 0:
        return row
    row["fp32_mb"] = round(onnx_path.stat().st_size / 1e6, 1)
    quant_args = ["quantize", str(onnx_path), "-o", str(int8), "--batch", ",".join(map(str, batches)),
                  "--json", str(work / f"{name}.quant.json")]
    if time_budget:
        quant_args += ["--time-budget", str(time_budget)]
    if heldout:  # labelled held-out rows judge accuracy; the peers' training rows calibrate
        quant_args += ["--data", str(work / f"{name}.heldout.npz"), "--calibration", str(work / f"{name}.calib.npz")]
    row["quantize"] = run_step(quant_args)
    # peak_rss_mb is sampled from outside (steps.py); the stage's own figure, the highest of
    # its phases' peaks, is kept beside it
    printed = [line for line in row["quantize"]["tail"] if line.startswith("peak memory")]
    if printed:
        row["quantize"]["stage_peak_mb"] = float(printed[0].split()[2])
    record = json.loads((work / f"{name}.quant.json").read_text()) if (work / f"{name}.quant.json").exists() else {}
    row["chosen"] = (record.get("chosen") or {}).get("recipe")
    backend = (record.get("chosen") or {}).get("backend", "onnxruntime")
    row["phases"], row["ceiling"], row["rounds"] = record.get("phases"), record.get("ceiling"), record.get("rounds")
    row["phase_peak_mb"] = record.get("phase_peak_mb")
    started = time.perf_counter()
    try:
        quantize_dynamic(str(onnx_path), str(plain), weight_type=QuantType.QInt8)
    except Exception as exc:  # as a user would meet it; then on a copy without value_info
        from edgepipe.quantize.rewrites import strip_value_info

        row["plain_dynamic_error"] = f"{type(exc).__name__}: {str(exc).strip()[:160]}"
        stripped = strip_value_info(onnx_path, work / f"{name}.stripped.onnx")
        quantize_dynamic(str(stripped), str(plain), weight_type=QuantType.QInt8)
    row["plain_dynamic_seconds"] = round(time.perf_counter() - started, 1)
    if optimum_python:
        row["optimum"] = optimum_step(onnx_path, work, optimum_python)
        if row["optimum"]["exit"] == 0:
            row["quantize_vs_optimum"] = round(row["quantize"]["seconds"] / row["optimum"]["seconds"], 2)
    peers: dict[str, tuple[Path, str]] = {}
    if nncf_python:
        row["nncf"], nncf = nncf_step(onnx_path, work, nncf_python)
        peers["nncf_openvino"] = (nncf, "openvino")
    for mode in ("dynamic", "static") if olive_python else ():
        row[f"olive_{mode}"], olive = olive_step(onnx_path, work, olive_python, mode)
        if olive is not None:
            peers[f"olive_{mode}"] = (olive, "onnxruntime")
    if int8.exists():
        row |= compare(onnx_path, int8, plain, batches, rounds, backend, peers, heldout)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,mobilenetv2,vit-base,bert-base")
    parser.add_argument("--batch", default=None, help="batch sizes (default: 1,8; the zoo's 1,32)")
    parser.add_argument("--time-budget", type=float, default=None, help="edgepipe quantize's (default: its own)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--nncf-python", default=None,
                        help="python of a venv with nncf + openvino: add OpenVINO+NNCF INT8 as a peer")
    parser.add_argument("--optimum-python", default=None,
                        help="python of a venv with optimum-onnx: time Optimum's dynamic INT8 quantize beside "
                             "edgepipe's")
    parser.add_argument("--olive-python", default=None,
                        help="python of a venv with olive-ai: add Olive's dynamic and static INT8 as peers")
    args = parser.parse_args()
    from edgepipe.runtime import fingerprint
    from edgepipe.runtime.hardware import read_cpu

    cpu = read_cpu()
    print(json.dumps({"cpu": cpu.model, "features": cpu.features, "vnni": cpu.has_vnni}), flush=True)
    names = [m for name in args.models.split(",") for m in ([f"zoo-{z}" for z in ZOO] if name == "zoo" else [name])]
    out = Path(__file__).resolve().parent / "results" / "hf_models.json"
    rows = kept_rows(out, cpu, names)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            batch = args.batch or ("1,32" if name.startswith("zoo-") else "1,8")
            row = bench(name, Path(tmp), [int(b) for b in batch.split(",")], args.time_budget, args.rounds,
                        args.nncf_python,
                        args.optimum_python, args.olive_python)
            print(json.dumps(row), flush=True)
            rows.append(row)
            out.parent.mkdir(exist_ok=True)  # after every model: an interrupted run keeps what it measured
            out.write_text(json.dumps({"benchmark": "hf_models", "date": dt.date.today().isoformat(),
                                       "machine": fingerprint(), "cpu": cpu.model, "features": cpu.features,
                                       "rounds": args.rounds, "rows": rows}, indent=2))


def kept_rows(out: Path, cpu, names: list[str]) -> list[dict]:
    """The rows of an earlier run on this same CPU for models this run does not measure again."""
    try:
        earlier = json.loads(out.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(earlier, dict) or (earlier.get("cpu"), earlier.get("features")) != (cpu.model, cpu.features):
        return []
    return [row for row in earlier.get("rows", []) if row.get("model") not in names]


if __name__ == "__main__":
    main()
