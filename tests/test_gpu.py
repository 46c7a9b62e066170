"""GPU paths: CUDA/TensorRT providers with options, IO binding, FP16 models, CPU-fallback report.

Every test here needs onnxruntime-gpu on a machine with a GPU and skips cleanly otherwise
(CI has none). The same code paths run on the CPU in test_engine.py (device="cpu")."""

from __future__ import annotations

import sys
from pathlib import Path

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


def _tiny_hf(name: str, folder):
    """Hugging Face folders of the four real-size families (and DistilBERT) at toy widths."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    text = dict(vocab_size=500, max_position_embeddings=64, num_labels=3)
    built = {
        "resnet": lambda: transformers.ResNetForImageClassification(transformers.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], num_labels=5)),
        "mobilenetv2": lambda: transformers.MobileNetV2ForImageClassification(transformers.MobileNetV2Config(
            depth_multiplier=0.35, image_size=96, num_labels=5)),
        "vit": lambda: transformers.ViTForImageClassification(transformers.ViTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
            patch_size=8, num_labels=5)),
        "bert": lambda: transformers.BertForSequenceClassification(transformers.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, **text)),
        "distilbert": lambda: transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(
            dim=32, n_layers=2, n_heads=4, hidden_dim=64, **text)),
    }[name]()
    if name == "mobilenetv2":  # untrained, its logits are ~1e-25: under FP16's range
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
        from hf_models import calibrate_batchnorm

        calibrate_batchnorm(built, built.config.image_size)
    built.eval().save_pretrained(folder)
    return folder


# ops that carry a model's arithmetic: none of them may leave the GPU
COMPUTE_OPS = {"Conv", "MatMul", "Gemm", "Softmax", "LayerNormalization", "Gelu", "FusedMatMul", "Attention",
               "MultiHeadAttention", "SkipLayerNormalization", "BiasGelu", "FastGelu", "GlobalAveragePool"}


@needs_cuda
@pytest.mark.parametrize("name", ["resnet", "mobilenetv2", "vit", "bert", "distilbert"])
def test_hf_folders_run_on_cuda_in_fp32_and_fp16(tmp_path, name):
    """A Hugging Face folder of each family exported by edgepipe runs on the CUDA provider with
    its arithmetic on the GPU: full FP32 (TF32 off) within 1e-4 of the CPU, the TF32 default and
    the FP16 model (FP32 I/O) within stated relative L2 errors."""
    from edgepipe.exporters import export
    from edgepipe.quantize.builders import build
    from edgepipe.quantize.recipes import Recipe
    from edgepipe.runtime.spec import make_feeds

    fp32 = export(_tiny_hf(name, tmp_path / name), tmp_path / f"{name}.onnx").artifacts["onnx"]
    fp16 = tmp_path / f"{name}.fp16.onnx"
    build(Recipe("fp16"), fp32, fp16, None, 0)
    cpu = Engine(fp32, providers="cpu")
    feeds = make_feeds(cpu.inputs, batch=4, seed=1)
    out = cpu.output_names[0]
    reference = cpu.run(feeds)[out]
    strict = Engine(fp32, providers="cuda", provider_options={"cuda": {"use_tf32": 0}})
    assert strict.providers[0] == "CUDAExecutionProvider"
    np.testing.assert_allclose(strict.run(feeds)[out], reference, rtol=1e-4, atol=1e-4)
    # TF32: 10-bit mantissa (unit roundoff ~5e-4); FP16: the same 10 bits with FP16's range
    assert fidelity(Engine(fp32, providers="cuda").run(feeds)[out], reference)["rel_l2"] < 2e-3
    half = Engine(fp16, providers="cuda")
    assert fidelity(half.run(feeds)[out], reference)["rel_l2"] < 1e-2
    for engine in (strict, half):
        placement = engine.placement(feeds)
        off_gpu = {n["op"] for n in placement["fell_back"]}
        assert not off_gpu & COMPUTE_OPS, placement["fell_back"]


def _wide_mlp(path, features: int = 256, width: int = 4096, layers: int = 4):
    """A compute-bound MLP (4 x 4096^2 weights): at batch 256 and more its GEMMs, not kernel
    launches or input copies, set the time, and FP16 tensor cores do them faster than TF32."""
    from onnx import TensorProto, helper, numpy_helper, save

    rng = np.random.default_rng(0)
    nodes, inits, x, fan_in = [], [], "x", features
    for i in range(layers):
        w = (rng.standard_normal((fan_in, width)) * np.sqrt(2 / fan_in)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]), helper.make_node("Relu", [f"m{i}"], [f"r{i}"])]
        x, fan_in = f"r{i}", width
    inits.append(numpy_helper.from_array((rng.standard_normal((width, 10)) / np.sqrt(width)).astype(np.float32),
                                         "head"))
    nodes.append(helper.make_node("MatMul", [x, "head"], ["logits"]))
    graph = helper.make_graph(nodes, "wide",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], inits)
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(path))
    return path


@needs_cuda
def test_quantize_on_cuda_ships_fp16_measured_faster_on_the_gpu(tmp_path, cli):
    """`edgepipe quantize --device cuda` times FP16 against FP32 on the GPU (not on the CPU,
    where FP16 is slower) and ships it only because it measured faster there."""
    import json

    model = _wide_mlp(tmp_path / "wide.onnx")
    out, record = tmp_path / "wide.fp16.onnx", tmp_path / "q.json"
    result = cli("quantize", model, "-o", out, "--device", "cuda", "--batch", "256,1024", "--json", record)
    assert result.exit_code == 0, result.output
    assert "measured on CUDAExecutionProvider" in result.output
    report = json.loads(record.read_text())
    assert report["device"]["provider"][0] == "CUDAExecutionProvider"
    assert report["chosen"]["recipe"] == "fp16/io-fp32"
    assert all(s >= 1.05 for s in report["chosen"]["speedup"].values()), report["chosen"]
    feeds = {"x": np.random.default_rng(5).standard_normal((16, 256)).astype(np.float32)}
    got = Engine(out, providers="cuda").run(feeds)["logits"]
    assert fidelity(got, Engine(model, providers="cpu").run(feeds)["logits"])["rel_l2"] < 1e-2
