"""`quantize()`: one entry for every model kind. A decoder that `export()` wrote with its KV
cache goes to the decoder search (weight-only INT4 and dynamic INT8, timed per output token,
judged by perplexity and greedy-token agreement: `DecoderQuantizeConfig`); every other model
goes to the classifier search (`QuantizeConfig`). Both return a StageResult and raise the same
AccuracyError / LatencyError, with every candidate in `report`, when none qualifies."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from edgepipe.artifacts import StageResult, require_file
from edgepipe.errors import InputError
from edgepipe.quantize.config import EvalData, QuantizeConfig
from edgepipe.runtime.generate import DECODER_KEY
from edgepipe.runtime.modelfile import onnx_metadata


def quantize(onnx_path: str | Path, out_path: str | Path, config=None, *, eval_data: EvalData | None = None,
             calibration: EvalData | None = None, cpu=None,
             progress: Callable[[str], None] | None = None) -> StageResult:
    """Stage: an FP32 ONNX model -> its fastest quantized model within the budget. `config` is a
    QuantizeConfig for a classifier-style model, a DecoderQuantizeConfig for a decoder (None:
    the defaults of whichever the file is). A decoder's `eval_data` is held-out text as token
    windows (`{"input_ids": [rows, length]}`); without it, the bundled text judges."""
    onnx_path = require_file(onnx_path, "ONNX model")
    if DECODER_KEY not in onnx_metadata(onnx_path):
        if config is not None and not isinstance(config, QuantizeConfig):
            raise InputError(f"{onnx_path.name} is not a decoder with a KV cache: quantize it with a QuantizeConfig, "
                             f"not a {type(config).__name__}")
        from edgepipe.quantize.stage import quantize as quantize_classifier

        return quantize_classifier(onnx_path, out_path, config, eval_data=eval_data, calibration=calibration,
                                   cpu=cpu, progress=progress)
    from edgepipe.quantize.decoder import DecoderQuantizeConfig, quantize_decoder

    if config is not None and not isinstance(config, DecoderQuantizeConfig):
        raise InputError(f"{onnx_path.name} is a decoder with a KV cache: its search takes a DecoderQuantizeConfig "
                         "(perplexity and token-agreement budgets, time per output token), not a "
                         f"{type(config).__name__}")
    if calibration is not None:
        raise InputError("a decoder's recipes take no calibration rows: pass held-out text as eval_data "
                         "({'input_ids': [rows, length]}), which GPTQ also calibrates on")
    heldout = None
    if eval_data is not None:
        if "input_ids" not in eval_data.inputs:
            raise InputError(f"a decoder is judged on held-out token ids: eval_data has {', '.join(eval_data.inputs)}, "
                             "not 'input_ids' [rows, length]")
        heldout = eval_data.inputs["input_ids"]
    return quantize_decoder(onnx_path, out_path, config, heldout_ids=heldout, progress=progress)


def weight_only_int4(onnx_path: str | Path, out_path: str | Path, spec) -> None:
    """A decoder's INT4 weight-only model as the decoder search builds it first (round-to-nearest,
    blocks of 128, INT8 compute), with no search: export's route choice times each route's INT4
    graph with it. `spec`: the decoder's DecoderSpec."""
    from edgepipe.quantize.decoder_build import BY_NAME, build

    build(BY_NAME["int4-rtn-b128-acc4"], Path(onnx_path), Path(out_path), spec, None)
