"""Datasets that work offline: scikit-learn's bundled digits, a generated sequence task, user .npz."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepipe.artifacts import read_npz
from edgepipe.errors import InputError
from edgepipe.runtime.spec import InputSpec

# Marker task: the label is the token right after the (single) marker token. Every other
# position holds random tokens from the same range, so a bag-of-words model is near chance:
# the model must use the order of the sequence.
MARKER = 1
MARKER_CLASSES = 4
MARKER_VOCAB = 12
MARKER_LENGTH = 24


@dataclass
class Dataset:
    """Train/test split plus what a model needs to know about its inputs."""

    name: str
    kind: str  # "image" (N,C,H,W float), "vector" (N,F float) or "tokens" (N,L int64)
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    vocab_size: int | None = None
    split: str = "bundled split"  # where the held-out rows come from

    @property
    def input_name(self) -> str:
        return "ids" if self.kind == "tokens" else "x"

    def input_specs(self) -> list[InputSpec]:
        sample = self.x_train.shape[1:]
        if self.kind == "tokens":
            return [InputSpec(self.input_name, "int64", ("batch", "seq"), low=0,
                              high=self.vocab_size, example={"seq": int(sample[0])})]
        return [InputSpec(self.input_name, "float32", ("batch", *map(int, sample)))]

    def info(self) -> dict:
        return {"name": self.name, "kind": self.kind, "num_classes": self.num_classes,
                "vocab_size": self.vocab_size, "sample_shape": list(self.x_train.shape[1:]),
                "train": len(self.y_train), "test": len(self.y_test), "split": self.split}


def _split(x: np.ndarray, y: np.ndarray, seed: int, test_fraction: float = 0.2):
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    n_test = max(1, int(round(len(y) * test_fraction)))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def digits(seed: int = 0) -> Dataset:
    """8x8 handwritten digits (1,797 images, 10 classes) bundled with scikit-learn."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    return Dataset("digits", "image", *_split(x, y, seed), num_classes=10)


def make_marker_sequences(n: int, length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.integers(2, MARKER_VOCAB, size=(n, length))
    pos = rng.integers(0, length - 1, size=n)
    y = rng.integers(0, MARKER_CLASSES, size=n)
    rows = np.arange(n)
    x[rows, pos] = MARKER
    x[rows, pos + 1] = 2 + y
    return x.astype(np.int64), y.astype(np.int64)


def marker(seed: int = 0, n_train: int = 6000, n_test: int = 1500,
           length: int = MARKER_LENGTH) -> Dataset:
    """Generated sequence task: classify the token that follows the marker (order matters)."""
    x_train, y_train = make_marker_sequences(n_train, length, seed)
    x_test, y_test = make_marker_sequences(n_test, length, seed + 10_000)
    return Dataset("marker", "tokens", x_train, y_train, x_test, y_test,
                   num_classes=MARKER_CLASSES, vocab_size=MARKER_VOCAB)


def from_npz(path: str | Path, seed: int = 0) -> Dataset:
    """User data: an .npz with `x` and `y` (and optionally `x_test`, `y_test`).

    Integer `x` of shape (N, L) is a token sequence; float (N, C, H, W) an image; float (N, F)
    a feature vector.
    """
    path = Path(path)
    data = read_npz(path, "dataset file")
    missing = [k for k in ("x", "y") if k not in data.files]
    if missing:
        raise InputError(f"{path} lacks array(s) {', '.join(missing)}; an edgepipe dataset .npz "
                         f"needs 'x' (inputs) and 'y' (integer labels); it has {', '.join(data.files)}")
    x, y = data["x"], data["y"]
    if len(x) != len(y):
        raise InputError(f"{path}: x has {len(x)} rows but y has {len(y)}")
    if not np.issubdtype(y.dtype, np.integer):
        raise InputError(f"{path}: y must hold integer class labels, got dtype {y.dtype}")
    if np.issubdtype(x.dtype, np.integer) and x.ndim == 2:
        kind, x = "tokens", x.astype(np.int64)
    elif np.issubdtype(x.dtype, np.floating) and x.ndim in (2, 4):
        kind, x = ("vector" if x.ndim == 2 else "image"), x.astype(np.float32)
    else:
        raise InputError(f"{path}: x has dtype {x.dtype} and shape {list(x.shape)}; expected "
                         "int (N, L) tokens, float (N, F) vectors or float (N, C, H, W) images")
    y = y.astype(np.int64)
    if "x_test" in data.files and "y_test" in data.files:
        split = (x, y, data["x_test"].astype(x.dtype), data["y_test"].astype(np.int64))
        how = f"held-out rows from {path.name}'s x_test/y_test"
    else:
        split = _split(x, y, seed)
        how = (f"{path.name} has no x_test/y_test: a seeded 80/20 split of its {len(y)} rows "
               f"(seed {seed}); add x_test and y_test to choose the held-out rows")
    vocab = int(max(split[0].max(), split[2].max())) + 1 if kind == "tokens" else None
    classes = int(max(split[1].max(), split[3].max())) + 1
    return Dataset(path.stem, kind, *split, num_classes=classes, vocab_size=vocab, split=how)


DATASETS = {"digits": digits, "marker": marker}


def load_dataset(name: str, seed: int = 0) -> Dataset:
    """A bundled dataset by name, or a user .npz by path."""
    if name.endswith(".npz"):
        return from_npz(name, seed)
    if name not in DATASETS:
        raise InputError(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)} "
                         "or pass a path to an .npz with 'x' and 'y'")
    return DATASETS[name](seed=seed)
