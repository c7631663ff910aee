"""The cross-check's torch models: an MLP, a ResNet-style CNN and a ViT-style block stack.

Each is a ``Sequential`` of layers (``model.layers``), one FSDP unit per layer
under ZeRO-3, followed by a mean cross-entropy loss. No dropout and no
BatchNorm: their randomness and batch statistics cannot match across
frameworks. ``xla_fsdp.reference.models`` defines the same functions in JAX on
the same parameter names and layouts (torch's: ``Linear`` weights are
(out, in), convolutions OIHW, activations NCHW). A ``Size`` sets the widths:
``TINY`` for the cross-check, ``BENCH`` for ``benchmarks/fsdp_bench.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

MODELS = ("mlp", "cnn", "vit")
NUM_CLASSES = 10


@dataclass(frozen=True)
class Size:
    """Widths of the three model families."""

    mlp: tuple[int, ...] = (64, 33, 17)     # input width, then hidden widths
    image: tuple[int, int, int] = (3, 8, 8)
    cnn_channels: tuple[int, int] = (8, 6)  # two conv layers, the second with stride 2
    cnn_residual_blocks: int = 0            # residual 3x3 conv blocks after them
    vit_dim: int = 24
    vit_heads: int = 2
    vit_patch: int = 4
    vit_blocks: int = 2


TINY = Size()
# About 48M parameters in the MLP; ~0.4M in the CNN; ~1.8M in the ViT stack.
BENCH = Size(mlp=(1024, 3840, 3840, 3840, 3840), image=(3, 32, 32), cnn_channels=(32, 64),
             cnn_residual_blocks=4, vit_dim=192, vit_heads=3, vit_patch=4, vit_blocks=4)


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
    def __init__(self, c_in: int, c_out: int, stride: int, residual: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        self.residual = residual

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return x + y if self.residual else y


class PatchEmbed(nn.Module):
    def __init__(self, size: Size):
        super().__init__()
        self.proj = nn.Conv2d(size.image[0], size.vit_dim, size.vit_patch, stride=size.vit_patch)
        self.pos = nn.Parameter(torch.zeros((size.image[1] // size.vit_patch) ** 2, size.vit_dim))

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2) + self.pos


class Block(nn.Module):
    def __init__(self, size: Size):
        super().__init__()
        d = size.vit_dim
        self.heads = size.vit_heads
        self.norm1 = nn.LayerNorm(d)
        # No bias: the key bias has an exactly zero gradient (softmax ignores a
        # per-row constant), so AdamW would turn fp32 noise into lr-sized steps
        # whose sign depends on rounding order, on either side.
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        hd = d // self.heads
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Head(nn.Module):
    def __init__(self, size: Size):
        super().__init__()
        self.norm = nn.LayerNorm(size.vit_dim)
        self.fc = nn.Linear(size.vit_dim, NUM_CLASSES)

    def forward(self, x):
        return self.fc(self.norm(x).mean(dim=1))


class Net(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


def layer_modules(name: str, size: Size) -> list[nn.Module]:
    if name == "mlp":
        widths = [*size.mlp, NUM_CLASSES]
        return [Dense(a, b, i < len(widths) - 2) for i, (a, b) in enumerate(zip(widths, widths[1:]))]
    if name == "cnn":
        (c_in, h, _), (c1, c2) = size.image, size.cnn_channels
        return [ConvLayer(c_in, c1, 1), ConvLayer(c1, c2, 2),
                *[ConvLayer(c2, c2, 1, residual=True) for _ in range(size.cnn_residual_blocks)],
                Dense(c2 * ((h + 1) // 2) ** 2, NUM_CLASSES, False, flatten=True)]
    if name == "vit":
        return [PatchEmbed(size), *[Block(size) for _ in range(size.vit_blocks)], Head(size)]
    raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")


def build(name: str, seed: int = 0, size: Size = TINY) -> Net:
    """The model ``name`` with deterministic weights (normal, std 0.9/sqrt(fan_in))."""
    model = Net(layer_modules(name, size))
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


def make_batches(name: str, steps: int, batch: int, seed: int = 1, size: Size = TINY):
    """``steps`` global batches of (inputs, labels) for model ``name``."""
    gen = torch.Generator().manual_seed(seed)
    shape = (size.mlp[0],) if name == "mlp" else size.image
    return [(torch.randn(batch, *shape, generator=gen), torch.randint(0, NUM_CLASSES, (batch,), generator=gen))
            for _ in range(steps)]


# Optimizer settings shared by both sides. AdamW uses torch's defaults except
# a larger lr, so that a few steps move the weights measurably.
SGD = dict(lr=0.05, momentum=0.9)
ADAMW = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
GLOBAL_BATCH = 16
