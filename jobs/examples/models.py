"""Model factories named by specs as ``jobs.examples.models:<name>``.

Each returns a plain ``torch.nn.Module`` whose ``forward(x)`` gives logits; the trainer applies the
spec's loss. They are deliberately small so tests and the demo run on 2 CPU cores.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def mlp(in_dim: int = 32, hidden: int = 64, num_classes: int = 4, depth: int = 2) -> nn.Module:
    """An MLP classifier: ``x`` float32 [B, in_dim] -> logits [B, num_classes]."""
    layers: list[nn.Module] = []
    d = in_dim
    for _ in range(depth):
        layers += [nn.Linear(d, hidden), nn.GELU()]
        d = hidden
    layers.append(nn.Linear(d, num_classes))
    return nn.Sequential(*layers)


# model FLOPs per training sample (the train loop's model FLOP/s): 2 per weight forward, 4 backward
mlp.flops_per_sample = lambda model: 6.0 * sum(p.numel() for p in model.parameters())


class TinyLM(nn.Module):
    """A tiny causal transformer LM: ``x`` int64 [B, T] tokens -> logits [B, T, vocab]."""

    def __init__(self, vocab: int = 256, d_model: int = 64, n_layers: int = 2, n_heads: int = 4,
                 seq_len: int = 32, dropout: float = 0.0):
        super().__init__()
        self.seq_len = seq_len
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        layer = nn.TransformerEncoderLayer(d_model, n_heads, 4 * d_model, dropout=dropout,
                                           batch_first=True, norm_first=True, activation="gelu")
        self.blocks = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        nn.init.normal_(self.tok.weight, std=1 / math.sqrt(d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        pos = torch.arange(t, device=x.device)
        h = self.tok(x) + self.pos(pos)[None]
        mask = torch.triu(torch.full((t, t), float("-inf"), device=x.device), diagonal=1)
        h = self.blocks(h, mask=mask, is_causal=True)
        return self.head(self.norm(h))


def tiny_lm(vocab: int = 256, d_model: int = 64, n_layers: int = 2, n_heads: int = 4,
            seq_len: int = 32) -> nn.Module:
    return TinyLM(vocab, d_model, n_layers, n_heads, seq_len)
