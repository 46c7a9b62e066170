"""The second route to an ONNX decoder: ONNX Runtime GenAI's model builder (`onnxruntime-genai`,
the `genai` extra). It writes its own graph from the folder's weights, with fused operators
(GroupQueryAttention, SkipSimplifiedLayerNormalization, rotary embedding caches) instead of
tracing torch. Its cache inputs are renamed to edgepipe's (past_key_values.{i}.key ->
past.{i}.key), and the graph gets the same metadata as a dynamo export, so everything downstream
(parity, quantize, generate, profile, serve) treats both routes alike.

Nothing is taken on trust: the built graph goes through the same parity verdict as the dynamo
export (measured here: on a small Llama trained on text, the builder's FP32 graph gave logits up
to 10.5 away from transformers' at the first step), and `route="auto"` keeps the faster per
output token of the routes that pass.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnx
from onnx.external_data_helper import uses_external_data

from edgepipe import onnxfile
from edgepipe.errors import ExportError
from edgepipe.runtime.generate import DecoderSpec

ROUTES = ("dynamo", "genai", "auto")
GENAI_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
# Weights below this become part of one self-contained file; above it the builder's data file
# is kept as the model's sidecar (moved, not read).
INLINE_BYTES = 100_000_000


def genai_installed() -> bool:
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return False
    return True


def build_genai(folder: Path, out: Path, spec: DecoderSpec, attach, precision: str = "fp32",
                target: str = "cpu") -> float:
    """Run the builder on `folder` (FP32 for the CPU unless told otherwise: fp16 with target
    cuda is what it builds for GPUs), rename its cache inputs, attach edgepipe's metadata with
    `attach(model)`, and write it to `out`. Returns the build's seconds."""
    if not genai_installed():
        raise ExportError("the genai route needs onnxruntime-genai: pip install 'edgepipe[genai]'")
    with tempfile.TemporaryDirectory(prefix="edgepipe-genai-") as work:
        built = Path(work) / "model"
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder),
                               "-o", str(built), "-p", precision, "-e", target, "-c", str(Path(work) / "cache")],
                              capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if proc.returncode or not (built / "model.onnx").is_file():
            raise ExportError(f"ONNX Runtime GenAI's builder could not build {spec.architecture}: "
                              f"{builder_error(proc.stdout + proc.stderr, proc.returncode)}")
        place_graph(built / "model.onnx", out, lambda model: (rename_cache_inputs(model, spec), attach(model)))
    return seconds


def builder_error(output: str, returncode: int, limit: int = 300) -> str:
    """The builder's reason in one line: its last error line, and where that line ends in a colon
    ("... use a model from one of:"), the lines it introduces, joined, up to `limit` characters."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    if not lines:
        return f"exit {returncode}"
    at = next((i for i in range(len(lines) - 1, -1, -1) if "Error" in lines[i] or "not" in lines[i].lower()),
              len(lines) - 1)
    why = lines[at]
    if why.endswith(":") and at + 1 < len(lines):
        why += " " + ", ".join(lines[at + 1:])
    return why if len(why) <= limit else why[:limit - 1] + "…"


def place_graph(src: Path, out: Path, edit) -> None:
    """Write `src`'s graph, changed by `edit(model)`, to `out` without loading large weights: the
    builder's external data file is moved to be `out`'s sidecar and the tensors pointed at it
    (a 0.34B model's 1.35 GB is never read into memory); small models become one file."""
    model = onnx.load(str(src), load_external_data=False)
    edit(model)
    files = {entry.value for tensor in model.graph.initializer if uses_external_data(tensor)
             for entry in tensor.external_data if entry.key == "location"}
    if not files:
        onnxfile.save(model, out)
        return
    data = sum((src.parent / f).stat().st_size for f in files)
    if len(files) > 1 or data < INLINE_BYTES:  # small (or unusual): one self-contained file
        onnx.load_external_data_for_model(model, str(src.parent))
        onnxfile.save(model, out)
        return
    shutil.move(str(src.parent / files.pop()), str(onnxfile.sidecar(out)))
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = onnxfile.sidecar(out).name
    onnx.save(model, str(out))


def rename_cache_inputs(model: onnx.ModelProto, spec: DecoderSpec) -> None:
    """past_key_values.{i}.key/value -> past.{i}.key/value, in the inputs and wherever used;
    any other input or output than edgepipe's runtime feeds and reads is an ExportError."""
    names = {}
    for graph_input in model.graph.input:
        match = GENAI_PAST.match(graph_input.name)
        if match:
            names[graph_input.name] = f"past.{match.group(1)}.{match.group(2)}"
            graph_input.name = names[graph_input.name]
    for node in model.graph.node:
        node.input[:] = [names.get(name, name) for name in node.input]
    expected_in = {"input_ids", "attention_mask", *spec.past_names()}
    expected_out = {"logits", *spec.present_names()}
    got_in, got_out = {i.name for i in model.graph.input}, {o.name for o in model.graph.output}
    if got_in != expected_in or got_out != expected_out:
        raise ExportError(f"GenAI's graph has inputs {sorted(got_in - expected_in)} / outputs "
                          f"{sorted(got_out - expected_out)} beyond what edgepipe's decoder runtime feeds and "
                          f"reads (missing: {sorted((expected_in - got_in) | (expected_out - got_out))})")
