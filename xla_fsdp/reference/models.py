"""The cross-check models in JAX, on torch's parameter names and layouts.

Each model is a list of layers ``(prefix, apply)``: ``apply(params, x)`` takes
the layer's parameters under their names relative to ``prefix`` (e.g.
``fc.weight`` for ``layers.0.fc.weight``). Keeping torch's layouts ((out, in)
Linear weights, OIHW kernels, NCHW activations) means a parameter flattens to
the same element order on both sides, so per-rank shards compare directly; the
layout difference between the frameworks lives in the ops (``x @ w.T``,
``dimension_numbers``) instead of in a converted copy of the weights.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from ..crosscheck.models import TINY, Size

HIGHEST = lax.Precision.HIGHEST
Layer = tuple[str, Callable]


def _linear(p, x, name):
    y = jnp.matmul(x, p[f"{name}.weight"].T, precision=HIGHEST)
    return y + p[f"{name}.bias"] if f"{name}.bias" in p else y


def _conv(p, x, name, stride, padding):
    y = lax.conv_general_dilated(x, p[f"{name}.weight"], (stride, stride), [(padding, padding)] * 2,
                                 dimension_numbers=("NCHW", "OIHW", "NCHW"), precision=HIGHEST)
    return y + p[f"{name}.bias"][None, :, None, None]


def _layer_norm(p, x, name, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * lax.rsqrt(var + eps) * p[f"{name}.weight"] + p[f"{name}.bias"]


def _dense(act, flatten=False):
    def apply(p, x):
        x = x.reshape(x.shape[0], -1) if flatten else x
        y = _linear(p, x, "fc")
        return jnp.tanh(y) if act else y
    return apply


def _conv_layer(stride, residual=False):
    def apply(p, x):
        y = jax.nn.relu(_conv(p, x, "conv", stride, 1))
        return x + y if residual else y
    return apply


def _patch_embed(patch):
    def apply(p, x):
        y = _conv(p, x, "proj", patch, 0)
        b, d = y.shape[:2]
        return y.reshape(b, d, -1).transpose(0, 2, 1) + p["pos"]
    return apply


def _block(heads):
    return lambda p, x: _block_apply(p, x, heads)


def _block_apply(p, x, heads):
    b, t, d = x.shape
    hd = d // heads
    qkv = _linear(p, _layer_norm(p, x, "norm1"), "qkv").reshape(b, t, 3, heads, hd).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = jax.nn.softmax(jnp.matmul(q, k.swapaxes(-1, -2), precision=HIGHEST) / math.sqrt(hd), axis=-1)
    out = jnp.matmul(attn, v, precision=HIGHEST).transpose(0, 2, 1, 3).reshape(b, t, d)
    x = x + _linear(p, out, "proj")
    h = jax.nn.gelu(_linear(p, _layer_norm(p, x, "norm2"), "fc1"), approximate=False)
    return x + _linear(p, h, "fc2")


def _head(p, x):
    return _linear(p, _layer_norm(p, x, "norm").mean(axis=1), "fc")


def layers(name: str, size: Size = TINY) -> list[Layer]:
    """The layers of model ``name``, matching ``xla_fsdp.crosscheck.models.build(name, size=size)``."""
    specs = {
        "mlp": [_dense(i < len(size.mlp) - 1) for i in range(len(size.mlp))],
        "cnn": [_conv_layer(1), _conv_layer(2), *[_conv_layer(1, True)] * size.cnn_residual_blocks,
                _dense(False, flatten=True)],
        "vit": [_patch_embed(size.vit_patch), *[_block(size.vit_heads)] * size.vit_blocks, _head],
    }[name]
    return [(f"layers.{i}.", apply) for i, apply in enumerate(specs)]


def cross_entropy(logits, labels):
    """Mean cross-entropy, as ``torch.nn.functional.cross_entropy``."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, labels[:, None], axis=-1).mean()
