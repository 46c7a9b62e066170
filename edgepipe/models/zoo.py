"""The reference zoo: an MLP, a small CNN, an LSTM classifier and a small Transformer encoder."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from edgepipe.errors import InputError
from edgepipe.models.data import Dataset


class MLP(nn.Module):
    def __init__(self, in_features: int, num_classes: int, hidden: tuple[int, ...] = (512, 512)):
        super().__init__()
        layers, width = [nn.Flatten()], in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def structure(self) -> dict:
        """Constructor kwargs that rebuild this (possibly pruned) shape."""
        linears = [m for m in self.net if isinstance(m, nn.Linear)]
        return {"hidden": [m.out_features for m in linears[:-1]]}


class SmallCNN(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, channels: tuple[int, ...] = (32, 64, 64)):
        super().__init__()
        c1, c2, c3 = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(c3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))

    def structure(self) -> dict:
        return {"channels": [m.out_channels for m in self.features if isinstance(m, nn.Conv2d)]}


class LSTMClassifier(nn.Module):
    def __init__(self, vocab_size: int, num_classes: int, embed: int = 32, hidden: int = 128):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.lstm(self.embed(ids))
        return self.head(h[-1])

    def structure(self) -> dict:
        return {"embed": self.embed.embedding_dim, "hidden": self.lstm.hidden_size}


class SelfAttention(nn.Module):
    """Plain multi-head self-attention (exports to MatMul/Softmax that every runtime handles)."""

    def __init__(self, dim: int, heads: int, head_dim: int | None = None):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim or dim // heads
        self.qkv = nn.Linear(dim, 3 * self.heads * self.head_dim)
        self.proj = nn.Linear(self.heads * self.head_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, self.heads * self.head_dim)
        return self.proj(out)


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ff: int, head_dim: int | None = None):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), SelfAttention(dim, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff), nn.GELU(), nn.Linear(ff, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ff(self.norm2(x))


class TransformerClassifier(nn.Module):
    def __init__(self, vocab_size: int, num_classes: int, dim: int = 128, heads: int | list[int] = 4,
                 layers: int = 2, ff: int | list[int] = 512, max_len: int = 128,
                 head_dim: int | None = None):
        super().__init__()
        heads = heads if isinstance(heads, (list, tuple)) else [heads] * layers  # per layer once pruned
        ff = ff if isinstance(ff, (list, tuple)) else [ff] * layers
        head_dim = head_dim or dim // heads[0]
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.randn(max_len, dim))  # same scale as the token embedding: order must be visible
        self.layers = nn.ModuleList(EncoderLayer(dim, h, f, head_dim) for h, f in zip(heads, ff))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.head(F.gelu(self.norm(x).mean(dim=1)))

    def structure(self) -> dict:
        return {"dim": self.embed.embedding_dim, "layers": len(self.layers),
                "heads": [layer.attn.heads for layer in self.layers],
                "head_dim": self.layers[0].attn.head_dim,
                "ff": [layer.ff[0].out_features for layer in self.layers]}


@dataclass(frozen=True)
class ZooEntry:
    cls: type[nn.Module]
    kinds: tuple[str, ...]  # dataset kinds the model accepts
    kwargs: Callable[[Dataset], dict]  # constructor arguments derived from the dataset
    description: str


ZOO: dict[str, ZooEntry] = {
    "mlp": ZooEntry(MLP, ("image", "vector"),
                    lambda d: {"in_features": int(torch.tensor(d.x_train.shape[1:]).prod()),
                               "num_classes": d.num_classes},
                    "2-hidden-layer perceptron (512-512)"),
    "cnn": ZooEntry(SmallCNN, ("image",),
                    lambda d: {"in_channels": int(d.x_train.shape[1]), "num_classes": d.num_classes},
                    "3-conv CNN (32-64-64 channels)"),
    "lstm": ZooEntry(LSTMClassifier, ("tokens",),
                     lambda d: {"vocab_size": d.vocab_size, "num_classes": d.num_classes},
                     "embedding + 1-layer LSTM (128 hidden)"),
    "transformer": ZooEntry(TransformerClassifier, ("tokens",),
                            lambda d: {"vocab_size": d.vocab_size, "num_classes": d.num_classes,
                                       "max_len": max(128, int(d.x_train.shape[1]) * 2)},
                            "2-layer pre-norm Transformer encoder (dim 128, 4 heads, FFN 512)"),
}

DEFAULT_DATASET = {"mlp": "digits", "cnn": "digits", "lstm": "marker", "transformer": "marker"}


def zoo_kwargs(name: str, dataset: Dataset) -> dict:
    """Constructor arguments for zoo model `name` on `dataset`, or InputError if they don't fit."""
    if name not in ZOO:
        raise InputError(f"unknown model '{name}'; the zoo has {', '.join(ZOO)}")
    entry = ZOO[name]
    if dataset.kind not in entry.kinds:
        raise InputError(f"model '{name}' takes {' or '.join(entry.kinds)} data, but dataset "
                         f"'{dataset.name}' is {dataset.kind}")
    return entry.kwargs(dataset)


def build(name: str, kwargs: dict) -> nn.Module:
    if name not in ZOO:
        raise InputError(f"unknown model '{name}'; the zoo has {', '.join(ZOO)}")
    return ZOO[name].cls(**kwargs)
