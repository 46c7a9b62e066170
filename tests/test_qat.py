"""Quantization-aware training's parts, without training: the fake quantizers round weights as
onnxruntime's static INT8 recipe does, quantize every layer's input, pass gradients through,
and leave plain FP32 weights behind."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from byod import text_classifier

from edgepipe.errors import ConfigError
from edgepipe.models import qat
from edgepipe.models.trainer import FinetuneConfig

transformers = pytest.importorskip("transformers")


def _ort_per_channel(weight: np.ndarray) -> np.ndarray:
    """What onnxruntime's quantizer makes of a weight, symmetric INT8 per output channel, dequantized."""
    from onnxruntime.quantization.quant_utils import quantize_data

    rows = []
    for row in weight:
        _, scale, q = quantize_data(row, 3, True)  # 3: TensorProto.INT8
        rows.append(q.astype(np.float32) * scale)
    return np.stack(rows)


def test_weights_round_to_what_onnxruntime_int8_deploys_and_inputs_are_quantized_too():
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(16, 8))
    plain = torch.nn.Linear(16, 8)
    plain.load_state_dict(layer[0].state_dict())
    assert qat.prepare(layer, "asymmetric") == 1
    latent = layer[0].parametrizations.weight.original.detach().numpy()
    np.testing.assert_allclose(layer[0].weight.detach().numpy(), _ort_per_channel(latent), atol=1e-6)
    x = torch.randn(32, 16) * 3
    layer(x)  # the input observer sees the data
    out = layer(x)
    quantizer = getattr(layer[0], qat._INPUT)
    scale, zero = quantizer.scale.item(), quantizer.zero_point.item()
    rounded = (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale
    expected = torch.nn.functional.linear(rounded, layer[0].weight, layer[0].bias)
    assert torch.allclose(out, expected, atol=1e-5)
    assert not torch.allclose(out, plain(x), atol=1e-4)  # the rounding is really there


def test_gradients_pass_the_rounding_and_the_plain_weights_are_the_trained_fp32_ones():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert qat.prepare(model, "symmetric") == 2
    model(torch.randn(4, 3, 8, 8)).sum().backward()
    grad = model[2].parametrizations.weight.original.grad
    assert grad is not None and grad.abs().sum() > 0
    plain = qat.plain_state_dict(model)
    assert plain.keys() == before.keys() and all(torch.equal(plain[k], before[k]) for k in before)
    model[2].parametrizations.weight.original.data.add_(1.0)  # training moves the FP32 weights ...
    assert torch.equal(qat.plain_state_dict(model)["2.weight"], before["2.weight"] + 1)  # ... and they are kept
    x = torch.randn(2, 3, 8, 8)
    assert model(x).shape == (2, 2)  # the prepared model still runs with its quantizers


def test_a_hugging_face_model_saves_without_its_quantizers_and_reloads(tmp_path):
    folder = text_classifier(tmp_path / "bert")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder)
    layers = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert qat.prepare(model, qat.default_activations("text-classification")) == layers
    model.save_pretrained(tmp_path / "out", state_dict=qat.plain_state_dict(model))
    again = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert again.state_dict().keys() == transformers.AutoModelForSequenceClassification.from_pretrained(
        folder).state_dict().keys()


def test_an_unknown_activation_layout_is_refused():
    with pytest.raises(ConfigError, match="choose symmetric, asymmetric"):
        FinetuneConfig(qat=True, qat_activations="int3")
    with pytest.raises(ConfigError, match="choose symmetric, asymmetric"):
        qat.prepare(torch.nn.Linear(2, 2), "int3")
