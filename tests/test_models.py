"""Zoo, datasets and checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgepipe.errors import InputError
from edgepipe.models import load_checkpoint, load_dataset, train
from edgepipe.models.data import from_npz
from edgepipe.models.training import TrainConfig, accuracy, predict


@pytest.mark.parametrize("name, floor", [("mlp", 0.9), ("cnn", 0.85), ("lstm", 0.9), ("transformer", 0.6)])
def test_zoo_learns_its_task(zoo, name, floor):
    # 4-6 epochs in the fixture; chance is 0.10 (digits) and 0.25 (marker).
    assert zoo[name].train_record["test_accuracy"] >= floor


def test_marker_task_needs_the_order_of_the_sequence(zoo):
    model, _ = load_checkpoint(zoo["lstm"].checkpoint)
    data = zoo["lstm"].dataset
    rng = np.random.default_rng(0)
    shuffled = np.array([rng.permutation(row) for row in data.x_test])
    ordered_acc = accuracy(predict(model, data.x_test), data.y_test)
    shuffled_acc = accuracy(predict(model, shuffled), data.y_test)
    assert ordered_acc >= 0.9 and shuffled_acc <= 0.5  # same tokens, order destroyed


def test_checkpoint_loads_with_weights_only_and_rebuilds(zoo):
    payload = torch.load(zoo["cnn"].checkpoint, weights_only=True)
    assert payload["format"] == "edgepipe.checkpoint/1" and payload["model"] == "cnn"
    model, meta = load_checkpoint(zoo["cnn"].checkpoint)
    assert meta["input_specs"][0].shape == ("batch", 1, 8, 8)
    data = zoo["cnn"].dataset
    assert accuracy(predict(model, data.x_test), data.y_test) == pytest.approx(
        zoo["cnn"].train_record["test_accuracy"])


def test_user_npz_dataset(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    np.savez(tmp_path / "mine.npz", x=x, y=y)
    result = train("mlp", str(tmp_path / "mine.npz"), tmp_path / "ck.pt", TrainConfig(epochs=20))
    assert result.record["dataset"]["kind"] == "vector" and result.record["test_accuracy"] > 0.9


@pytest.mark.parametrize("arrays, message", [
    ({"x": np.zeros((4, 3), np.float32)}, "lacks array(s) y"),
    ({"x": np.zeros((4, 3), np.float32), "y": np.zeros(5, np.int64)}, "x has 4 rows but y has 5"),
    ({"x": np.zeros((4, 3), np.float32), "y": np.zeros(4, np.float32)}, "integer class labels"),
    ({"x": np.zeros((4, 3, 2), np.float32), "y": np.zeros(4, np.int64)}, "expected int (N, L) tokens"),
])
def test_bad_npz_datasets(tmp_path, arrays, message):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from_npz(tmp_path / "d.npz")


def test_unknown_dataset():
    with pytest.raises(InputError, match="unknown dataset 'cifar'"):
        load_dataset("cifar")
