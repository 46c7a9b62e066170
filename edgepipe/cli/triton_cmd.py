"""`edgepipe triton`: an NVIDIA Triton model repository for a model or a run's deployed model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from edgepipe.artifacts import require_file
from edgepipe.cli._common import check_outputs, handle_errors, parse_ints, write_json_out
from edgepipe.cli.choices import Backend


@handle_errors
def triton(
    model: Annotated[Path, typer.Argument(help="ONNX model, or a run directory (exports its deployed model).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Model repository folder (created or added to).")],
    name: Annotated[Optional[str], typer.Option(help="Triton model name. Default: the run's model name or the file's "
            "stem.")] = None,
    model_name: Annotated[Optional[str], typer.Option("--model-name", help="Model of the run directory to "
            "export.")] = None,
    version: Annotated[int, typer.Option(help="Model version folder.")] = 1,
    max_batch: Annotated[int, typer.Option(help="max_batch_size; 0 turns Triton's batching off.")] = 32,
    preferred: Annotated[Optional[str], typer.Option(help="Preferred batch sizes, e.g. 8,16,32.")] = None,
    max_queue_delay_us: Annotated[int, typer.Option(help="Longest wait to grow a batch, in microseconds.")] = 2000,
    max_queue: Annotated[int, typer.Option(help="Requests queued before Triton rejects new ones.")] = 256,
    instances: Annotated[int, typer.Option(help="Model instances (instance_group count).")] = 1,
    kind: Annotated[str, typer.Option(help="Instance kind: cpu or gpu.")] = "cpu",
    gpus: Annotated[Optional[str], typer.Option(help="gpu: device ids, e.g. 0,1 (default: all).")] = None,
    tensorrt_fp16: Annotated[bool, typer.Option(help="gpu: run through ORT's TensorRT accelerator in FP16.")] = False,
    validate: Annotated[bool, typer.Option(help="Parse config.pbtxt with Triton's ModelConfig schema (needs "
                                                "tritonclient).")] = True,
    backend: Annotated[Optional[Backend], typer.Option(help="Triton backend: onnxruntime or openvino (CPU). Default: "
            "the one the model was quantized for (its file records it), else onnxruntime.")] = None,
    allow_out_of_budget: Annotated[bool, typer.Option(help="Write it for a backend where the model's own record says "
            "it is out of its accuracy or speed budget (refused otherwise).")] = False,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the record here.")] = None,
) -> None:
    """Write OUT/<name>/config.pbtxt (inputs, outputs, dynamic batching, instance groups) and
    OUT/<name>/<version>/model.onnx. The config is parsed with Triton's own protobuf schema and
    checked against the model's real input/output names, types and dims before anything is
    written. Serve it with: tritonserver --model-repository OUT"""
    check_outputs(json_out, folders=(out,))
    from edgepipe.runtime import Engine
    from edgepipe.runtime.deployment import MeasuredOn, choose_backend
    from edgepipe.serve.triton import TritonConfig, export_triton

    if model.is_dir():
        engine = Engine.from_run(model, model_name, allow_out_of_budget=True)  # judged below, for Triton's backend
        path, default_name = engine.path, engine.run_info["model"]
    else:
        path, default_name = model, model.name.split(".")[0]
    runs_on = choose_backend(MeasuredOn.read(require_file(path, "ONNX model")), backend.value if backend else None,
                             kind == "cpu", allow_out_of_budget, Path(path).name)
    config = TritonConfig(name=name or default_name, version=version, max_batch=max_batch, backend=runs_on,
                          preferred_batch_sizes=parse_ints(preferred, "--preferred") if preferred else (),
                          max_queue_delay_us=max_queue_delay_us, max_queue_size=max_queue, instances=instances,
                          kind=kind, gpus=_device_ids(gpus), tensorrt_fp16=tensorrt_fp16)
    result = export_triton(path, out, config, validate=validate)
    checked = "checked with Triton's ModelConfig schema" if validate else "NOT checked (--no-validate)"
    typer.echo(f"wrote {result.artifacts['config']} and {result.artifacts['onnx']} ({checked})")
    typer.echo(f"serve it with: tritonserver --model-repository {out}")
    write_json_out(json_out, result.record)


def _device_ids(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    from edgepipe.errors import InputError

    try:
        ids = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        ids = ()
    if not ids or min(ids) < 0:
        raise InputError(f"--gpus must be comma-separated device ids, e.g. 0,1; got '{text}'")
    return ids
