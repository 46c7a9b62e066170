"""Quantization-aware training: fine-tune with the INT8 rounding the deployed model will have.

Every Linear and Conv2d gets torch.ao's FakeQuantize twice: on its weight (a parametrization;
symmetric per output channel over [-127, 127], the scale taken from the current weights, which
is the rule onnxruntime's and OpenVINO's static INT8 recipes apply to weights) and on its input
(per tensor, ranges from a moving-average min/max observer: zero-point-free INT8 for the
symmetric every-MatMul layout, or asymmetric UINT8 as onnxruntime's static QDQ default).
Gradients pass the rounding straight through, so the weights learn to sit where INT8 keeps them.
What leaves training is plain FP32 weights (plain_state_dict: the quantizers left out): `edgepipe export`
writes them and `edgepipe quantize` calibrates and judges the INT8 model like any other.
Attention's activation-by-activation MatMuls carry no fake quantizer."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.ao.quantization import (
    FakeQuantize,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
)
from torch.nn.utils import parametrize

from edgepipe.errors import ConfigError

Activations = Literal["symmetric", "asymmetric"]
ACTIVATIONS: tuple[Activations, ...] = ("symmetric", "asymmetric")
_LAYERS = (nn.Linear, nn.Conv2d)
_INPUT = "edgepipe_input_fake_quant"  # the submodule holding a layer's input quantizer


def weight_quantizer() -> FakeQuantize:
    # averaging_constant=1: the scale is the current weights' max |w| / 127, never a stale average
    return FakeQuantize(observer=MovingAveragePerChannelMinMaxObserver, averaging_constant=1.0, quant_min=-127,
                        quant_max=127, dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0)


def input_quantizer(activations: Activations) -> FakeQuantize:
    if activations == "symmetric":
        return FakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=-128, quant_max=127, dtype=torch.qint8,
                            qscheme=torch.per_tensor_symmetric)
    return FakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8,
                        qscheme=torch.per_tensor_affine)


def default_activations(task: str) -> Activations:
    """The layout quantize's search leads with: symmetric every-MatMul for transformers,
    onnxruntime's asymmetric UINT8 activations for convolutional image models."""
    return "asymmetric" if task == "image-classification" else "symmetric"


def _quantize_input(module: nn.Module, args: tuple):
    return (getattr(module, _INPUT)(args[0]), *args[1:])


def prepare(model: nn.Module, activations: Activations) -> int:
    """Put fake quantizers on every Linear and Conv2d of `model` in place; returns how many."""
    if activations not in ACTIVATIONS:
        raise ConfigError(f"QAT activations '{activations}' unknown; choose {', '.join(ACTIVATIONS)}")
    layers = [m for m in model.modules() if isinstance(m, _LAYERS)]
    for layer in layers:
        parametrize.register_parametrization(layer, "weight", weight_quantizer())
        layer.add_module(_INPUT, input_quantizer(activations))
        layer.register_forward_pre_hook(_quantize_input)
    return len(layers)


def observing(model: nn.Module, on: bool) -> None:
    """Let the quantizers' observers follow the data (training) or hold their ranges (judging)."""
    for module in model.modules():
        if isinstance(module, FakeQuantize):
            module.enable_observer(on)


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A prepared model's weights as the model without quantizers names them: each FP32 weight
    (the parametrization's original) under its own key, the quantizers' state left out."""
    plain = {}
    for key, value in model.state_dict().items():
        if key.endswith(".parametrizations.weight.original"):
            plain[key.removesuffix(".parametrizations.weight.original") + ".weight"] = value
        elif ".parametrizations.weight." not in key and f".{_INPUT}." not in key:
            plain[key] = value
    return plain
