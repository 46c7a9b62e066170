"""Structured pruning of Hugging Face classifier folders: heads and FFN neurons of a BERT, channels
of a ResNet, recovered by distillation on the user's rows, then exported and quantized like any
folder; the shapes a config cannot say travel in edgepipe_pruned.json."""

from __future__ import annotations

import json

import pytest
import torch
from byod import digit_folder, image_classifier, sentences, text_classifier, write_csv

from edgepipe.errors import InputError

transformers = pytest.importorskip("transformers")
pytest.importorskip("torch_pruning")


def test_a_narrowed_model_rebuilds_from_its_config_and_record_or_fails_in_one_line(tmp_path):
    from edgepipe.models import hf_pruned
    from edgepipe.models.hf import load_folder

    folder = text_classifier(tmp_path / "bert")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    reference = transformers.AutoModelForSequenceClassification.from_pretrained(folder)
    for layer in model.bert.encoder.layer:  # keep 40 of 64 FFN neurons, by hand
        layer.intermediate.dense = torch.nn.Linear(32, 40)
        layer.output.dense = torch.nn.Linear(40, 32)
    record = hf_pruned.structure(model, reference, {})
    assert set(record["shapes"]) == {f"bert.encoder.layer.{i}.{m}" for i in range(2) for m in (
        "intermediate.dense.weight", "intermediate.dense.bias", "output.dense.weight")}  # its bias keeps 32
    model.save_pretrained(tmp_path / "narrow")
    (tmp_path / "narrow" / hf_pruned.RECORD).write_text(json.dumps(record))
    loaded = load_folder(tmp_path / "narrow")[0].model
    ids = torch.randint(5, 20, (3, 9))
    assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6)
    record["shapes"]["bert.encoder.layer.0.output.dense.weight"] = [32, 48]  # not what the weights hold
    (tmp_path / "narrow" / hf_pruned.RECORD).write_text(json.dumps(record))
    with pytest.raises(InputError, match="does not rebuild from config.json and edgepipe_pruned.json"):
        load_folder(tmp_path / "narrow")


def test_attention_of_another_shape_is_refused_not_cut_across_heads():
    from edgepipe.prune.hf import _attention

    config = transformers.DistilBertConfig(vocab_size=30, dim=32, n_layers=1, n_heads=4, hidden_dim=64)
    with pytest.raises(InputError, match="whole heads of BERT-style attention"):
        _attention(transformers.DistilBertForSequenceClassification(config))
    bert = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=30, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64))
    assert len(_attention(bert)) == 2


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune_hf")
    from edgepipe.models.finetune import FinetuneConfig, finetune

    rows = write_csv(root / "rows.csv", sentences(300))
    finetune(text_classifier(root / "bert"), rows, root / "tuned", FinetuneConfig(epochs=3, lr=3e-3))
    return root / "tuned", rows


@pytest.mark.slow
def test_a_fine_tuned_bert_loses_half_its_heads_and_ffn_recovers_exports_and_quantizes(tuned, tmp_path, cli):
    folder, rows = tuned
    result = cli("prune", folder, "--data", rows, "-o", tmp_path / "pruned", "--ratio", "0.5", "--round-to", "0",
                 "--finetune-epochs", "2", "--lr", "1e-3", "--json", tmp_path / "prune.json")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "prune.json").read_text())
    assert record["params_after"] < 0.7 * record["params_before"] and record["macs_after"] < record["macs_before"]
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder)
    heads = [a["num_attention_heads"] for a in record["structure"]["attention"].values()]
    assert heads == [2] * model.config.num_hidden_layers  # half of each layer's 4 heads
    shapes = json.loads((tmp_path / "pruned" / "edgepipe_pruned.json").read_text())["shapes"]
    assert shapes["bert.encoder.layer.0.intermediate.dense.weight"] == [32, 32]  # 64 FFN neurons -> 32
    # recovered by distillation: on the learnable task it ends within two rows of the unpruned folder
    held = record["accuracy_intervals"]
    assert held["after"]["value"] >= held["before"]["value"] - 2 / 58 and "ORT p50 at batch 32" in result.output
    assert set(record["p50_ms"]) == {"1", "32"}
    assert cli("export", tmp_path / "pruned", "-o", tmp_path / "pruned.onnx").exit_code == 0
    result = cli("quantize", tmp_path / "pruned.onnx", "-o", tmp_path / "q.onnx", "--data", rows, "--batch", "32",
                 "--json", tmp_path / "q.json", "--time-budget", "10")
    assert result.exit_code in (0, 1), result.output  # 1: no INT8 candidate faster on this CPU
    assert json.loads((tmp_path / "q.json").read_text())["fp32"]["accuracy"] >= 0.8


@pytest.mark.slow
def test_a_resnet_folder_loses_channels_and_still_exports(tmp_path, cli):
    folder = image_classifier(tmp_path / "resnet")
    images = digit_folder(tmp_path / "digits", per_class=10)
    result = cli("prune", folder, "--data", images, "-o", tmp_path / "pruned", "--ratio", "0.5",
                 "--finetune-epochs", "1", "--json", tmp_path / "prune.json")
    assert result.exit_code == 0, result.output
    shapes = json.loads((tmp_path / "pruned" / "edgepipe_pruned.json").read_text())["shapes"]
    convs = {k: v for k, v in shapes.items() if k.endswith("convolution.weight")}
    assert convs and all(v[0] % 8 == 0 for v in convs.values())  # narrower, in whole groups of --round-to 8
    assert cli("export", tmp_path / "pruned", "-o", tmp_path / "pruned.onnx").exit_code == 0


def test_a_folder_without_rows_or_with_zoo_options_is_refused_and_leaves_nothing(tmp_path, cli):
    folder = text_classifier(tmp_path / "bert")
    for args, message in (((), "needs its labelled rows: --data"),
                          (("--data", "x.csv", "--steps", "2"), "in one step")):
        result = cli("prune", folder, *args, "-o", tmp_path / "out" / "pruned")
        assert result.exit_code == 2 and message in result.output, result.output
        assert not (tmp_path / "out").exists()
