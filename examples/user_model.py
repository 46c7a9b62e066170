"""A user model edgepipe did not write: token ids (int64) + attention mask (bool), embeddings,
multi-head attention, LayerNorm and GELU, with dynamic batch and sequence dims.

    edgepipe export examples/user_model.py:build -o text.onnx
"""

import torch
from torch import nn

VOCAB = 1000


class TextClassifier(nn.Module):
    def __init__(self, vocab: int = VOCAB, dim: int = 64, classes: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.attn = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        attended, _ = self.attn(x, x, x, need_weights=False)
        x = self.norm(x + attended)
        x = x + self.ff(x)
        weights = mask.to(x.dtype).unsqueeze(-1)
        pooled = (x * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.head(pooled)


def build():
    """Factory: the model plus its inputs as `name:dtype:dims[:low..high]`."""
    torch.manual_seed(0)
    model = TextClassifier()
    inputs = [f"ids:int64:batch,seq:0..{VOCAB}", "mask:bool:batch,seq"]
    return model, inputs, ["logits"]
