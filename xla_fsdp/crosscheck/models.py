"""The cross-check's torch models: an MLP, a small CNN and a ViT-style block stack.

Each is a ``Sequential`` of layers (``model.layers``), one FSDP unit per layer
under ZeRO-3, followed by a mean cross-entropy loss. No dropout and no
BatchNorm: their randomness and batch statistics cannot match across
frameworks. ``xla_fsdp.reference.models`` defines the same functions in JAX on
the same parameter names and layouts (torch's: ``Linear`` weights are
(out, in), convolutions OIHW, activations NCHW).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

MODELS = ("mlp", "cnn", "vit")
NUM_CLASSES = 10
IMAGE = (3, 8, 8)
MLP_IN = 64
VIT_DIM, VIT_HEADS, VIT_PATCH = 24, 2, 4


class Dense(nn.Module):
    def __init__(self, d_in: int, d_out: int, act: bool, flatten: bool = False):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)
        self.act, self.flatten = act, flatten

    def forward(self, x):
        x = x.flatten(1) if self.flatten else x
        y = self.fc(x)
        return torch.tanh(y) if self.act else y


class ConvLayer(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x))


class PatchEmbed(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(IMAGE[0], VIT_DIM, VIT_PATCH, stride=VIT_PATCH)
        self.pos = nn.Parameter(torch.zeros((IMAGE[1] // VIT_PATCH) ** 2, VIT_DIM))

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2) + self.pos


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1 = nn.LayerNorm(VIT_DIM)
        # No bias: the key bias has an exactly zero gradient (softmax ignores a
        # per-row constant), so AdamW would turn fp32 noise into lr-sized steps
        # whose sign depends on rounding order, on either side.
        self.qkv = nn.Linear(VIT_DIM, 3 * VIT_DIM, bias=False)
        self.proj = nn.Linear(VIT_DIM, VIT_DIM)
        self.norm2 = nn.LayerNorm(VIT_DIM)
        self.fc1 = nn.Linear(VIT_DIM, 2 * VIT_DIM)
        self.fc2 = nn.Linear(2 * VIT_DIM, VIT_DIM)

    def forward(self, x):
        b, t, d = x.shape
        hd = d // VIT_HEADS
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, VIT_HEADS, hd).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(VIT_DIM)
        self.fc = nn.Linear(VIT_DIM, NUM_CLASSES)

    def forward(self, x):
        return self.fc(self.norm(x).mean(dim=1))


class Net(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


def build(name: str, seed: int = 0) -> Net:
    """The model ``name`` with deterministic weights (normal, std 0.3/sqrt(fan_in))."""
    if name == "mlp":
        layers = [Dense(MLP_IN, 33, True), Dense(33, 17, True), Dense(17, NUM_CLASSES, False)]
    elif name == "cnn":
        layers = [ConvLayer(3, 8, 1), ConvLayer(8, 6, 2), Dense(6 * 4 * 4, NUM_CLASSES, False, flatten=True)]
    elif name == "vit":
        layers = [PatchEmbed(), Block(), Block(), Head()]
    else:
        raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")
    model = Net(layers)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen) if pname.endswith("weight")
                        else 0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel() if p.dim() > 1 else p.numel()
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3 / math.sqrt(fan_in) * 3)
    return model


def make_batches(name: str, steps: int, batch: int, seed: int = 1):
    """``steps`` global batches of (inputs, labels) for model ``name``."""
    gen = torch.Generator().manual_seed(seed)
    shape = (MLP_IN,) if name == "mlp" else IMAGE
    return [(torch.randn(batch, *shape, generator=gen), torch.randint(0, NUM_CLASSES, (batch,), generator=gen))
            for _ in range(steps)]

# Optimizer settings shared by both sides. AdamW uses torch's defaults except
# a larger lr, so that a few steps move the weights measurably.
SGD = dict(lr=0.05, momentum=0.9)
ADAMW = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
GLOBAL_BATCH = 16
