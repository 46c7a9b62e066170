"""GPU paths: CUDA/TensorRT providers with options, IO binding, FP16 models, CPU-fallback report.

Every test here needs onnxruntime-gpu on a machine with a GPU and skips cleanly otherwise
(CI has none). The same code paths run on the CPU in test_engine.py (device="cpu")."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from edgepipe.quantize.evaluation import fidelity
from edgepipe.runtime import Engine
from edgepipe.runtime.sessions import tensorrt_libraries_present

pytestmark = pytest.mark.gpu
CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
# onnxruntime-gpu always lists TensorRT; a session on it also needs TensorRT's libnvinfer
TRT = "TensorrtExecutionProvider" in ort.get_available_providers() and tensorrt_libraries_present()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA provider (onnxruntime-gpu on a GPU machine)")


@needs_cuda
def test_cuda_matches_cpu_and_reports_placement(zoo):
    for name in ("mlp", "cnn", "lstm", "transformer"):
        model = zoo[name]
        x = model.dataset.x_test[:8]
        cpu = Engine(model.onnx, providers="cpu").run(x)["logits"]
        # full FP32 (TF32 off): only the order of summation differs from the CPU's kernels
        strict = Engine(model.onnx, providers="cuda", provider_options={"cuda": {"device_id": 0, "use_tf32": 0}})
        assert strict.providers[0] == "CUDAExecutionProvider"
        np.testing.assert_allclose(strict.run(x)["logits"], cpu, rtol=1e-4, atol=1e-4)
        # onnxruntime's default on Ampere and later: TF32 matmuls and convolutions (10-bit
        # mantissa, unit roundoff 2^-11 ~ 5e-4), so logits move by ~1e-3 relative, never the class
        gpu = Engine(model.onnx, providers="cuda")
        tf32 = gpu.run(x)["logits"]
        assert fidelity(tf32, cpu)["rel_l2"] < 2e-3 and (tf32.argmax(1) == cpu.argmax(1)).all()
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


@needs_cuda
def test_decoder_generates_on_cuda_with_the_cache_kept_on_the_device(tiny_decoder):
    from edgepipe.runtime.generate import Generator, prefill_feeds

    path = tiny_decoder.artifacts["onnx"]
    cpu, gpu = Generator(path, providers="cpu"), Generator(path, providers="cuda")
    assert gpu.engine.providers[0] == "CUDAExecutionProvider"
    prompt = [3, 17, 42, 99, 7]
    feeds = prefill_feeds(gpu.spec, np.asarray([prompt]))
    logits, presents = gpu.runner()(feeds)
    assert all(p.device_name().lower() == "cuda" for p in presents)  # IO binding: no copy to the host
    np.testing.assert_allclose(logits, cpu.runner()(feeds)[0], rtol=1e-3, atol=1e-3)
    # 16 greedy steps with the cache fed back on the device choose the CPU's tokens
    assert gpu.generate(prompt, 16, stop_ids=()) == cpu.generate(prompt, 16, stop_ids=())
    assert gpu.generate_batch([prompt, prompt[::-1]], 8, stop_ids=()) == cpu.generate_batch(
        [prompt, prompt[::-1]], 8, stop_ids=())
