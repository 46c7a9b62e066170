"""Triton model repository export, checked with Triton's own ModelConfig protobuf schema."""

from __future__ import annotations

import pytest

from edgepipe.errors import ConfigError, InputError
from edgepipe.serve.triton import (
    TritonConfig,
    export_triton,
    render_config,
    triton_schema,
    validate_config,
)

pytest.importorskip("tritonclient", reason="Triton's schema comes from tritonclient (make installs it)")


def test_repository_layout_and_config_parse_with_tritons_schema(zoo, tmp_path):
    config = TritonConfig(name="tiny", version=3, max_batch=16, preferred_batch_sizes=(4, 16),
                          max_queue_delay_us=500, instances=2)
    result = export_triton(zoo["transformer"].onnx, tmp_path / "repo", config)
    assert result.artifacts["config"] == tmp_path / "repo" / "tiny" / "config.pbtxt"
    assert result.artifacts["onnx"].read_bytes() == zoo["transformer"].onnx.read_bytes()
    assert result.artifacts["onnx"].parent.name == "3"

    from google.protobuf import text_format

    schema = triton_schema()
    parsed = text_format.Parse(result.artifacts["config"].read_text(), schema.ModelConfig())
    assert parsed.max_batch_size == 16 and parsed.platform == "onnxruntime_onnx"
    assert list(parsed.dynamic_batching.preferred_batch_size) == [4, 16]
    assert parsed.dynamic_batching.max_queue_delay_microseconds == 500
    assert parsed.instance_group[0].count == 2
    assert parsed.instance_group[0].kind == schema.ModelInstanceGroup.KIND_CPU
    (ids,) = parsed.input
    assert ids.data_type == schema.TYPE_INT64 and list(ids.dims) == [-1]  # batch dim dropped, seq dynamic
    assert list(parsed.output[0].dims) == [zoo["transformer"].dataset.num_classes]
    assert list(parsed.version_policy.specific.versions) == [3]


def test_gpu_instances_and_tensorrt_accelerator(zoo, tmp_path):
    config = TritonConfig(name="cnn", kind="gpu", gpus=(0, 1), tensorrt_fp16=True)
    parsed = export_triton(zoo["cnn"].onnx, tmp_path, config).record["parsed"]
    assert parsed["instance_group"] == [{"count": 1, "kind": "KIND_GPU", "gpus": [0, 1]}]
    accelerator = parsed["optimization"]["execution_accelerators"]["gpu_execution_accelerator"][0]
    assert accelerator == {"name": "tensorrt", "parameters": {"precision_mode": "FP16"}}
    assert parsed["input"][0]["dims"] == ["1", "8", "8"]


def test_schema_and_model_mismatches_are_refused(zoo):
    text = render_config(zoo["cnn"].onnx, TritonConfig(name="cnn"))
    validate_config(text, zoo["cnn"].onnx)
    with pytest.raises(InputError, match="ModelConfig schema.*max_batchsize"):
        validate_config(text.replace("max_batch_size", "max_batchsize"), zoo["cnn"].onnx)
    with pytest.raises(InputError, match="ModelConfig schema"):
        validate_config(text.replace("KIND_CPU", "KIND_TPU"), zoo["cnn"].onnx)
    with pytest.raises(InputError, match=r"inputs \['image'\] differ"):
        validate_config(text.replace('name: "x"', 'name: "image"'), zoo["cnn"].onnx)
    with pytest.raises(InputError, match="dims"):
        validate_config(text.replace("dims: [ 1, 8, 8 ]", "dims: [ 8, 8 ]"), zoo["cnn"].onnx)
    with pytest.raises(InputError, match="TYPE_FP16"):
        validate_config(text.replace("TYPE_FP32", "TYPE_FP16", 1), zoo["cnn"].onnx)
    with pytest.raises(InputError, match="not onnxruntime_onnx"):
        validate_config(text.replace("onnxruntime_onnx", "tensorrt_plan"), zoo["cnn"].onnx)


def test_fixed_batch_models_and_bad_options(zoo, tmp_path):
    import onnx

    model = onnx.load(zoo["mlp"].onnx)
    for value in list(model.graph.input) + list(model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    fixed = tmp_path / "fixed.onnx"
    onnx.save(model, fixed)
    with pytest.raises(InputError, match="fixed first dim.*--max-batch 0"):
        render_config(fixed, TritonConfig())
    parsed = export_triton(fixed, tmp_path / "repo", TritonConfig(max_batch=0)).record["parsed"]
    assert "max_batch_size" not in parsed and "dynamic_batching" not in parsed  # 0 = no batching
    assert parsed["input"][0]["dims"] == ["1", "1", "8", "8"]  # full shape, batch included
    with pytest.raises(ConfigError, match="preferred"):
        TritonConfig(preferred_batch_sizes=(64,)).check()
    with pytest.raises(ConfigError, match="--kind gpu"):
        TritonConfig(tensorrt_fp16=True).check()


def test_cli_exports_a_runs_model(zoo, cli, tmp_path):
    out = tmp_path / "repo"
    result = cli("triton", zoo["lstm"].onnx, "-o", out, "--name", "lstm", "--preferred", "8,32",
                 "--json", tmp_path / "t.json")
    assert result.exit_code == 0, result.output
    assert "checked with Triton's ModelConfig schema" in result.output
    assert (out / "lstm" / "1" / "model.onnx").is_file()
    bad = cli("triton", zoo["lstm"].onnx, "-o", out, "--kind", "tpu")
    assert bad.exit_code == 2 and "cpu or gpu" in bad.output
    missing = cli("triton", tmp_path / "nope.onnx", "-o", out)
    assert missing.exit_code == 2 and "not found" in missing.output
