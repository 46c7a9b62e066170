"""Shared fixtures: the zoo trained briefly and exported once per test session, and the test
tiers: a test that needs a trained model (or a pipeline run) is `slow` by its fixtures."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

# Fixtures that train, run a pipeline or build and export a language model: every test using
# one (directly or through another fixture) is marked slow, so `make test-fast` (-m "not slow")
# never trains and stays under a minute.
TRAINING_FIXTURES = {"zoo", "run_dir", "ray_cluster", "tiny_llama"}


def pytest_collection_modifyitems(items):
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


ZOO_EPOCHS = {"mlp": 6, "cnn": 6, "lstm": 5, "transformer": 4}


@dataclass
class ZooModel:
    name: str
    dataset: object
    checkpoint: Path
    onnx: Path
    train_record: dict
    export_record: dict


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> dict[str, ZooModel]:
    """Every zoo model trained for a few epochs and exported (default exporter chain)."""
    from edgepipe.exporters import export
    from edgepipe.models import TrainConfig, load_dataset, train
    from edgepipe.models.zoo import DEFAULT_DATASET

    root = tmp_path_factory.mktemp("zoo")
    models = {}
    for name, epochs in ZOO_EPOCHS.items():
        data = load_dataset(DEFAULT_DATASET[name])
        trained = train(name, data, root / name / "checkpoint.pt", TrainConfig(epochs=epochs, lr=2e-3))
        exported = export(trained.artifacts["checkpoint"], root / name / "model.onnx",
                          data={data.input_name: data.x_test})
        models[name] = ZooModel(name, data, trained.artifacts["checkpoint"], exported.artifacts["onnx"],
                                trained.record, exported.record)
    return models


@pytest.fixture
def cli():
    """Invoke the CLI in-process: cli("export", "x.pt", "-o", "y.onnx") -> click Result."""
    from typer.testing import CliRunner

    from edgepipe.cli import app

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args])

    return invoke


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A tiny Llama folder (random weights, byte tokenizer) and its torch model."""
    import torch
    import transformers

    from edgepipe.models.lm import save_byte_tokenizer

    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      eos_token_id=255)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(root / "folder")
    save_byte_tokenizer(root / "folder")
    return root, model


@pytest.fixture(scope="session")
def tiny_decoder(tiny_llama):
    """The tiny Llama exported as a decoder with its KV cache (one export for the session): the
    graph traced by torch.onnx (the default route, auto, keeps the builder's graph for this model
    where onnxruntime-genai is installed; test_decoder covers that route and the choice)."""
    from edgepipe.exporters import ExportConfig, export

    root, _ = tiny_llama  # the public export(): a causal LM folder goes to the decoder export itself
    return export(root / "folder", root / "decoder.onnx", ExportConfig(route="dynamo"))
