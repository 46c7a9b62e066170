"""Hugging Face model folders (what save_pretrained writes) as export and pipeline sources,
built offline from configs with random weights."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import onnx
import pytest

from edgepipe.errors import InputError
from edgepipe.models.hf import infer_task

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")


def save(model, folder):
    model.save_pretrained(folder)
    return folder


def tiny_bert(folder, seed=0, head=True):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=500, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=3)
    model = transformers.BertForSequenceClassification(config) if head else transformers.BertModel(config)
    return save(model, folder)


def tiny_resnet(folder):
    torch.manual_seed(0)
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1],
                                       num_labels=5)
    return save(transformers.ResNetForImageClassification(config), folder)


@pytest.mark.parametrize("architectures, model_type, task", [
    (["BertForSequenceClassification"], "bert", "text-classification"),
    (["ViTForImageClassification"], "vit", "image-classification"),
    (["DistilBertForTokenClassification"], "distilbert", "token-classification"),
    (["BertModel"], "bert", "feature-extraction"),
    (["ResNetModel"], "resnet", "image-feature-extraction"),
])
def test_the_task_comes_from_the_configs_architectures(tmp_path, architectures, model_type, task):
    assert infer_task({"architectures": architectures, "model_type": model_type}, tmp_path) == task


def test_an_unknown_architecture_asks_for_a_task(tmp_path):
    with pytest.raises(InputError, match="pass --task"):
        infer_task({"architectures": ["BertForNextSentencePrediction"]}, tmp_path)


def test_folder_errors_are_one_line_and_exit_2(tmp_path, cli):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    result = cli("export", broken, "-o", tmp_path / "m.onnx")
    assert result.exit_code == 2 and "config.json is not readable JSON" in result.output
    assert "Traceback" not in result.output

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps(
        {"model_type": "bert", "architectures": ["BertForSequenceClassification"]}))
    result = cli("export", no_weights, "-o", tmp_path / "m.onnx")
    assert result.exit_code == 2 and "transformers cannot build a text-classification model" in result.output

    result = cli("export", no_weights, "-o", tmp_path / "m.onnx", "--task", "speech")
    assert result.exit_code == 2 and "unknown task 'speech'" in result.output

    (tmp_path / "net.py").write_text("def build():\n    return None\n")
    result = cli("export", f"{tmp_path / 'net.py'}:build", "-o", tmp_path / "m.onnx", "--task", "fill-mask")
    assert result.exit_code == 2 and "--task applies to Hugging Face model folders" in result.output


def test_a_corrupt_safetensors_file_in_a_classifier_folder_is_one_line_and_exit_2(tmp_path, cli):
    folder = tiny_bert(tmp_path / "bert")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])  # truncated: safetensors raises SafetensorError
    result = cli("export", folder, "-o", tmp_path / "m.onnx")
    assert result.exit_code == 2, result.output
    assert "transformers cannot build a text-classification model" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "m.onnx").exists()


@pytest.mark.slow
def test_a_text_classifier_folder_exports_and_matches_torch_at_a_new_length(tmp_path, cli):
    from edgepipe.runtime import Engine

    folder = tiny_bert(tmp_path / "bert")
    out = tmp_path / "bert.onnx"
    result = cli("export", folder, "-o", out, "--json", tmp_path / "export.json")
    assert result.exit_code == 0, result.output
    assert "Loading weights" not in result.output  # transformers' progress bars stay quiet
    record = json.loads((tmp_path / "export.json").read_text())
    assert record["outputs"] == ["logits"]
    assert [i["name"] for i in record["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
    assert {c["case"] for c in record["parity"]["cases"]} >= {"batch=1 seq=64", "batch=7 seq=64", "batch=7 seq=33"}

    engine = Engine(out)
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 500, size=(3, 23))
    mask = np.ones_like(ids)
    mask[0, 15:] = 0  # padding: the mask must reach the attention
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    got = engine.run({"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})["logits"]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)
    # the model's own limits travel in the file: vocabulary (500), positions (64), mask values
    bad = ids.copy()
    bad[1, 2] = -3  # Gather would wrap a negative id into another token: refused instead
    with pytest.raises(InputError, match="'input_ids' holds -3, outside the model's range 0..499"):
        engine.run({"input_ids": bad, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})
    long = rng.integers(0, 500, size=(1, 65))
    with pytest.raises(InputError, match="'input_ids' has seq = 65, more than the model's 64"):
        engine.run({"input_ids": long, "attention_mask": np.ones_like(long), "token_type_ids": np.zeros_like(long)})

    # Calibration outputs every intermediate tensor, so its rows per call come from their size.
    # ONNX's shape inference stops at the exported graph's first data-dependent shape; the
    # symbolic inference sizes them (BERT-base: 205 MB per row of 128 tokens, 1 row per call,
    # where the size rule's 8 rows made a 3.3 GB calibration peak). Truth: every float tensor
    # the graph computes for one row, from the reference evaluator.
    from onnx.reference import ReferenceEvaluator

    from edgepipe.onnxgraph import activation_bytes, skeleton, symbolic_activation_bytes
    from edgepipe.quantize.calibration import ACTIVATION_BYTES, calibration_rows

    row = {"input_ids": ids[:1], "attention_mask": mask[:1], "token_type_ids": np.zeros_like(ids[:1])}
    assert activation_bytes(skeleton(out), row) is None
    estimate = symbolic_activation_bytes(out, row)
    model = onnx.load(out)
    computed = [o for n in model.graph.node for o in n.output if o]
    values = ReferenceEvaluator(model).run(None, row, intermediate=True)
    truth = sum(np.asarray(values[name]).size * 4 for name in computed if name in values)
    assert estimate is not None and abs(estimate - truth) <= 0.1 * truth, (estimate, truth)
    data = {k: np.repeat(v, 64, axis=0) for k, v in row.items()}
    assert calibration_rows(out, data) == min(32, ACTIVATION_BYTES // estimate)


@pytest.mark.slow
def test_image_and_feature_extraction_folders_export_with_their_outputs(tmp_path):
    from edgepipe.exporters import export

    resnet = export(tiny_resnet(tmp_path / "resnet"), tmp_path / "resnet.onnx").report
    assert resnet.outputs == ["logits"] and resnet.inputs[0]["shape"] == ["batch", 3, 224, 224]
    backbone = export(tiny_bert(tmp_path / "backbone", head=False), tmp_path / "backbone.onnx").report
    assert backbone.outputs == ["last_hidden_state", "pooler_output"]


@pytest.mark.slow
def test_a_pipeline_takes_a_folder_relative_to_its_config_and_fingerprints_its_weights(tmp_path):
    from edgepipe.pipeline import config as config_mod
    from edgepipe.pipeline.runner import run_pipeline

    tiny_bert(tmp_path / "models" / "bert")
    path = tmp_path / "p.toml"
    path.write_text(textwrap.dedent("""
        out_dir = "run"
        stages = ["export", "profile"]
        [profile]
        batch_sizes = [1, 4]
        rounds = 3
        [[models]]
        name = "bert"
        source = "models/bert"
        task = "text-classification"
    """))
    first = run_pipeline(config_mod.load(path))
    assert first.ok, first.table()
    stages = first.manifest["models"]["bert"]["stages"]
    assert stages["export"]["record"]["outputs"] == ["logits"]
    # what each stage cost: loading transformers and a model needs well over 100 MB
    assert stages["export"]["peak_rss_mb"] > 100 and stages["export"]["seconds"] > 0
    assert "## What each stage cost" in (tmp_path / "run" / "report.md").read_text()
    logs: list[str] = []
    run_pipeline(config_mod.load(path), resume=True, log=logs.append)
    assert any("export: reused" in line for line in logs)

    tiny_bert(tmp_path / "models" / "bert", seed=1)  # new weights, same config
    logs.clear()
    run_pipeline(config_mod.load(path), resume=True, log=logs.append)
    assert not any("export: reused" in line for line in logs)


def test_a_config_source_that_is_no_model_is_refused_before_any_work(tmp_path):
    from edgepipe.errors import ConfigError
    from edgepipe.pipeline import config as config_mod

    (tmp_path / "empty").mkdir()
    path = tmp_path / "p.toml"
    path.write_text('stages = ["export"]\n[[models]]\nname = "x"\nsource = "empty"\n')
    with pytest.raises(ConfigError, match="nor a Hugging Face model folder with config.json"):
        config_mod.load(path)
    path.write_text('stages = ["export"]\n[[models]]\nname = "cnn"\ntask = "fill-mask"\n')
    with pytest.raises(ConfigError, match="task applies only to a Hugging Face folder"):
        config_mod.load(path)
