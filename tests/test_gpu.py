"""GPU paths: CUDA/TensorRT providers with options, IO binding, FP16 models, CPU-fallback report.

Every test here needs onnxruntime-gpu on a machine with a GPU and skips cleanly otherwise
(CI has none). The same code paths run on the CPU in test_engine.py (device="cpu")."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from edgepipe.runtime import Engine

pytestmark = pytest.mark.gpu
CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
TRT = "TensorrtExecutionProvider" in ort.get_available_providers()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA provider (onnxruntime-gpu on a GPU machine)")


@needs_cuda
def test_cuda_matches_cpu_and_reports_placement(zoo):
    for name in ("mlp", "cnn", "lstm", "transformer"):
        model = zoo[name]
        x = model.dataset.x_test[:8]
        gpu = Engine(model.onnx, providers="cuda", provider_options={"cuda": {"device_id": 0}})
        assert gpu.providers[0] == "CUDAExecutionProvider"
        np.testing.assert_allclose(gpu.run(x)["logits"], Engine(model.onnx, providers="cpu").run(x)["logits"],
                                   rtol=1e-3, atol=1e-3)  # TF32/cuDNN algorithms differ from MLAS
        placement = gpu.placement(x)
        assert placement["nodes_per_provider"].get("CUDAExecutionProvider", 0) > 0, placement
        # every node that did not run on CUDA is listed, and nothing else
        off_gpu = sum(n for p, n in placement["nodes_per_provider"].items() if p != "CUDAExecutionProvider")
        assert len(placement["fell_back"]) == off_gpu, placement


@needs_cuda
def test_io_binding_keeps_tensors_on_the_device(zoo):
    engine = Engine(zoo["mlp"].onnx, providers="cuda")
    x = zoo["mlp"].dataset.x_test[:32]
    on_device = engine.to_device(x)
    assert on_device.device_name().lower() == "cuda"
    out = engine.run_bound({"x": on_device}, keep_on_device=True)["logits"]
    assert out.device_name().lower() == "cuda"  # no copy back until asked
    np.testing.assert_allclose(out.numpy(), engine.run(x)["logits"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(engine.run_bound(x)["logits"], engine.run(x)["logits"], rtol=1e-4, atol=1e-4)


@needs_cuda
def test_fp16_model_on_cuda_keeps_fp32_io_and_accuracy(zoo, tmp_path):
    from edgepipe.quantize.builders import build
    from edgepipe.quantize.recipes import Recipe

    model = zoo["cnn"]
    fp16 = tmp_path / "cnn.fp16.onnx"
    build(Recipe("fp16"), model.onnx, fp16, None, 0)
    engine = Engine(fp16, providers="cuda")
    assert engine.inputs[0].dtype == "float32"  # I/O types kept
    x, y = model.dataset.x_test, model.dataset.y_test
    half = engine.run(x)["logits"]
    full = Engine(model.onnx, providers="cpu").run(x)["logits"]
    np.testing.assert_allclose(half, full, rtol=2e-2, atol=2e-2)  # FP16 has ~3 decimal digits
    assert abs((half.argmax(1) == y).mean() - (full.argmax(1) == y).mean()) <= 0.01


@pytest.mark.skipif(not TRT, reason="no TensorRT provider")
def test_tensorrt_fp16_with_engine_cache(zoo, tmp_path):
    options = {"tensorrt": {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
                            "trt_engine_cache_path": str(tmp_path)}}
    engine = Engine(zoo["cnn"].onnx, providers=["tensorrt", "cuda", "cpu"], provider_options=options)
    assert engine.providers[0] == "TensorrtExecutionProvider"
    x = zoo["cnn"].dataset.x_test[:8]
    np.testing.assert_allclose(engine.run(x)["logits"], Engine(zoo["cnn"].onnx, providers="cpu").run(x)["logits"],
                               rtol=2e-2, atol=2e-2)
    assert any(tmp_path.iterdir())  # the built TensorRT engine was cached
