"""Small models covering every capture rule (shared by capture tests)."""

import torch
from torch import nn


def mlp():
    return nn.Sequential(nn.Linear(6, 9), nn.ReLU(inplace=True), nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 4))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 4, 3, stride=2, bias=False)
        self.c3 = nn.Conv1d(4, 3, 2)
        self.fc = nn.Linear(3 * 2, 4)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = torch.tanh(self.c2(h))  # (b, 4, 3, 3)
        h = h.mean(-1)  # (b, 4, 3)
        h = torch.relu(self.c3(h))  # (b, 3, 2)
        return self.fc(h.flatten(1))


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, -1)
        q, k, v = (z.reshape(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5), -1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, t, d))


class TinyGPT(nn.Module):
    """Embedding tied to the output head, a root-level positional parameter (fallback),
    LayerNorm, a hand-written attention and nn.MultiheadAttention (fallback, opaque)."""

    def __init__(self, vocab=11, d=8, t=5):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(t, d) * 0.1)
        self.ln1 = nn.LayerNorm(d)
        self.att = Attention(d, 2)
        self.ln2 = nn.LayerNorm(d)
        self.mha = nn.MultiheadAttention(d, 2, batch_first=True)
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx):
        h = self.wte(idx) + self.pos[: idx.shape[1]]
        h = h + self.att(self.ln1(h))
        z = self.ln2(h)
        h = h + self.mha(z, z, z, need_weights=False)[0]
        return self.head(self.ln_f(h))  # (b, t, vocab)


class Scale(nn.Module):
    """No registered rule: needs the torch.func fallback."""

    def __init__(self, d):
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, d))
        self.t = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        return torch.tanh(x * self.s + self.t)


def fallback_model():
    return nn.Sequential(nn.Linear(6, 5), Scale(5), nn.Linear(5, 4))
