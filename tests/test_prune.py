"""Pruning: shapes shrink, parity holds, fine-tuning recovers, speed is measured, not claimed."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch

from edgepipe.errors import InputError
from edgepipe.exporters import export, export_module
from edgepipe.models import load_checkpoint
from edgepipe.models.training import accuracy, predict
from edgepipe.prune import PruneConfig
from edgepipe.prune import prune as prune_stage
from edgepipe.runtime import Engine


def prune(checkpoint, out, config=None, **kwargs):
    """The prune stage with the exporter the pipeline and CLI give it."""
    return prune_stage(checkpoint, out, config, exporter=export_module, **kwargs)


@pytest.fixture(scope="module")
def pruned_cnn(zoo, tmp_path_factory):
    out = tmp_path_factory.mktemp("prune") / "cnn.pt"
    return prune(zoo["cnn"].checkpoint, out, PruneConfig(ratio=0.5, steps=2, finetune_epochs=3))


def test_cnn_channels_shrink_and_latency_is_measured_in_ort(zoo, pruned_cnn):
    rec = pruned_cnn.record
    assert rec["structure"]["channels"] == [16, 32, 32]  # 32-64-64 halved, multiples of 8
    assert rec["params_after"] < rec["params_before"] / 2 and rec["macs_after"] < rec["macs_before"] / 2
    assert rec["p50_ms"]["32"]["pruned"] > 0 and rec["speedup"]["32"] > 1.0


def test_pruned_checkpoint_is_weights_only_and_exports_with_parity(zoo, pruned_cnn, tmp_path):
    path = pruned_cnn.artifacts["checkpoint"]
    payload = torch.load(path, weights_only=True)  # raises if anything but tensors/primitives
    assert payload["model_kwargs"]["channels"] == [16, 32, 32]
    model, _ = load_checkpoint(path)
    data = zoo["cnn"].dataset
    assert accuracy(predict(model, data.x_test), data.y_test) == pytest.approx(pruned_cnn.record["accuracy_after"])
    result = export(path, tmp_path / "pruned.onnx", data={"x": data.x_test})
    assert result.record["parity"]["ok"]
    assert Engine(tmp_path / "pruned.onnx").run(data.x_test[:3])["logits"].shape == (3, 10)


def test_fine_tuning_recovers_accuracy(zoo, pruned_cnn, tmp_path):
    without = prune(zoo["cnn"].checkpoint, tmp_path / "raw.pt",
                    PruneConfig(ratio=0.5, steps=2, finetune_epochs=0)).record
    with_ft = pruned_cnn.record
    assert without["accuracy_drop"] > 0.05, without["accuracy_after"]  # pruning alone hurts
    assert with_ft["accuracy_drop"] <= 0.015, with_ft["accuracy_after"]  # fine-tuning brings it back
    assert [s["accuracy_after_finetune"] for s in without["steps"]] == [
        s["accuracy_after_prune"] for s in without["steps"]]


@pytest.mark.slow
def test_transformer_loses_heads_and_ffn_width_and_keeps_parity(zoo, tmp_path):
    result = prune(zoo["transformer"].checkpoint, tmp_path / "t.pt",
                   PruneConfig(ratio=0.5, head_ratio=0.5, steps=1, finetune_epochs=1, batch_sizes=(8,)))
    structure = result.record["structure"]
    assert max(structure["heads"]) < 4 and max(structure["ff"]) < 512 and structure["dim"] == 128
    data = zoo["transformer"].dataset
    exported = export(result.artifacts["checkpoint"], tmp_path / "t.onnx", data={"ids": data.x_test})
    assert exported.record["parity"]["ok"]


def test_unstructured_reports_sparsity_and_size_never_speed(zoo, tmp_path):
    rec = prune(zoo["mlp"].checkpoint, tmp_path / "u.pt",
                PruneConfig(method="unstructured", ratio=0.7, finetune_epochs=1)).record
    assert rec["speedup"] is None and "not dense speed" in rec["note"]
    assert rec["sparsity"] == pytest.approx(0.7, abs=0.05)
    assert rec["compressed_bytes_after"] < 0.7 * rec["compressed_bytes_before"]
    assert rec["params_after"] == rec["params_before"]  # zeros are still parameters


def test_speedup_gate_fails_on_a_pruning_that_gains_nothing(tmp_path, cli):
    config = tmp_path / "p.toml"
    config.write_text(textwrap.dedent("""
        out_dir = "run"
        stages = ["train", "prune"]
        [train]
        epochs = 2
        [prune]
        method = "unstructured"
        ratio = 0.5
        finetune_epochs = 0
        [budgets]
        min_prune_speedup = 1.2
        max_prune_accuracy_drop = 0.5
        [[models]]
        name = "mlp"
        dataset = "digits"
    """))
    result = cli("run", config)
    assert result.exit_code == 1, result.output
    assert "min_prune_speedup" in result.output and "violates" in result.output


def test_lstm_that_cannot_be_pruned_says_so(zoo, tmp_path):
    with pytest.raises(InputError, match="no prunable channel group"):
        prune(zoo["lstm"].checkpoint, tmp_path / "l.pt", PruneConfig(steps=1, finetune_epochs=0))
    assert not (tmp_path / "l.pt").exists()


def test_protect_names_unknown_module(zoo, tmp_path):
    from edgepipe.errors import ConfigError

    with pytest.raises(ConfigError, match="no module named features.9"):
        prune(zoo["cnn"].checkpoint, tmp_path / "p.pt", PruneConfig(protect=("features.9",)))


def test_protected_layer_keeps_its_channels(zoo, tmp_path):
    rec = prune(zoo["cnn"].checkpoint, tmp_path / "p.pt",
                PruneConfig(protect=("features.0",), steps=1, finetune_epochs=0)).record
    assert rec["structure"]["channels"][0] == 32 and rec["structure"]["channels"][1] < 64


def test_prune_cli(cli, zoo, tmp_path):
    out = tmp_path / "pruned.pt"
    result = cli("prune", zoo["mlp"].checkpoint, "-o", out, "--steps", "1", "--finetune-epochs", "1",
                 "--batch", "8")
    assert result.exit_code == 0, result.output
    assert "params" in result.output and "faster" in result.output and out.exists()
    x = np.zeros((2, 1, 8, 8), np.float32)
    assert load_checkpoint(out)[0](torch.from_numpy(x)).shape == (2, 10)


def test_taylor_importance_and_global_pruning(zoo, tmp_path):
    rec = prune(zoo["mlp"].checkpoint, tmp_path / "t.pt",
                PruneConfig(importance="taylor", global_pruning=True, steps=1, finetune_epochs=1)).record
    assert rec["params_after"] < rec["params_before"]
    assert all(width % 8 == 0 for width in rec["structure"]["hidden"])  # round_to holds globally too
    assert rec["accuracy_drop"] <= 0.05
