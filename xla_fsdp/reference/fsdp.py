"""FSDP in JAX: shards on a one-axis mesh, and the ZeRO-2 / ZeRO-3 training step.

Shard layout: each parameter is flattened in torch's element order, zero-padded
to a multiple of the world size and split in equal contiguous pieces, rank r
holding piece r: exactly ``xla_fsdp._layout.ShardLayout`` (flat), which this
module uses for its sizes. A sharded parameter is a global array of shape
``(padded_numel,)`` with ``PartitionSpec("fsdp")``, so device r holds shard r,
the same elements as rank r's shard in xla_fsdp with ``flatten_parameters=False``.

ZeRO-3: each layer all-gathers its weights (``all_gather(..., tiled=True)``)
inside a per-layer ``jax.checkpoint`` whose policy saves everything except the
gathered weights, so backward gathers them again; autodiff turns the gather's
transpose into the reduce-scatter. With ``grad_ckpt`` the policy saves nothing
(the layer's activations are recomputed too).

ZeRO-2: weights are gathered once, compute is replicated, and gradients are
reduce-scattered explicitly with ``psum_scatter``. Pitfall: under shard_map's
type checks a replicated (invariant) input gets its gradient already summed
over the axis; marking the gathered weights as varying
(``jax.lax.pcast(..., to="varying")``, in ``_varying``) keeps each rank's
gradient local, so the explicit ``psum_scatter`` counts it once.

Gradients are averaged over ranks (each rank's loss is the mean over its
local batch), as xla_fsdp's reduce-scatter does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import NamedSharding, PartitionSpec as P

from .._layout import ShardLayout
from . import optim
from ..crosscheck.models import TINY, Size
from .models import cross_entropy, layers

AXIS = "fsdp"


def make_mesh(world_size: int) -> jax.sharding.Mesh:
    devices = jax.devices()
    if len(devices) < world_size:
        raise ValueError(f"JAX sees {len(devices)} devices, need {world_size}: set "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={world_size} before importing jax")
    return jax.sharding.Mesh(np.array(devices[:world_size]), (AXIS,))


def shard_params(full: dict[str, np.ndarray], mesh) -> tuple[dict, dict[str, ShardLayout]]:
    """Full numpy parameters -> sharded global arrays (padded, flat) and their layouts."""
    world = mesh.devices.size
    sharding = NamedSharding(mesh, P(AXIS))
    layouts, sharded = {}, {}
    for name, value in full.items():
        layout = ShardLayout(value.shape, world)
        flat = np.zeros(layout.padded_numel, value.dtype)
        flat[:layout.numel] = value.reshape(-1)
        layouts[name], sharded[name] = layout, jax.device_put(flat, sharding)
    return sharded, layouts


def unshard(sharded: dict, layouts: dict[str, ShardLayout]) -> dict[str, np.ndarray]:
    return {n: np.asarray(v)[:layouts[n].numel].reshape(layouts[n].shape) for n, v in sharded.items()}


def _pad_flat(x, layout: ShardLayout):
    return jnp.pad(x.reshape(-1), (0, layout.padding))


def _varying(x):
    """``x`` typed as varying over the mesh axis (see the pitfall in the module docstring).

    JAX 0.10 already types an all-gather's output as varying; a value that is
    invariant (replicated) is cast, so its gradient is not summed implicitly.
    """
    return x if AXIS in jax.typeof(x).manual_axis_type.varying else jax.lax.pcast(x, AXIS, to="varying")


def _unpad(x, layout: ShardLayout):
    return x[:layout.numel].reshape(layout.shape)


def make_train_step(model: str, layouts: dict[str, ShardLayout], mesh, *, zero: int, optimizer: str,
                    grad_ckpt: bool, size: Size = TINY):
    """A jitted ``step(shards, opt_state, x, y) -> (shards, opt_state, loss, grad_shards)``."""
    world = mesh.devices.size
    model_layers = layers(model, size)
    names_of = [[n for n in layouts if n.startswith(prefix)] for prefix, _ in model_layers]

    def run_layer(i, params, x):
        prefix, apply = model_layers[i]
        return apply({n[len(prefix):]: params[n] for n in names_of[i]}, x)

    def zero3_loss(shards, x, y):
        h = x
        for i in range(len(model_layers)):
            def layer(local, h, i=i):
                full = {n: checkpoint_name(
                    _unpad(jax.lax.all_gather(local[n], AXIS, tiled=True), layouts[n]), "gathered")
                    for n in names_of[i]}
                return run_layer(i, full, h)
            policy = (jax.checkpoint_policies.nothing_saveable if grad_ckpt
                      else jax.checkpoint_policies.save_anything_except_these_names("gathered"))
            h = jax.checkpoint(layer, policy=policy)({n: shards[n] for n in names_of[i]}, h)
        return cross_entropy(h, y)

    def zero2_loss(full, x, y):
        h = x
        for i in range(len(model_layers)):
            layer = functools.partial(run_layer, i)
            if grad_ckpt:
                layer = jax.checkpoint(layer, policy=jax.checkpoint_policies.nothing_saveable)
            h = layer(full, h)
        return cross_entropy(h, y)

    def local_step(shards, opt_state, x, y):
        if zero == 3:
            loss, grads = jax.value_and_grad(zero3_loss)(shards, x, y)
            grads = {n: g / world for n, g in grads.items()}   # gather's transpose sums; average
        else:
            full = {n: _varying(_unpad(jax.lax.all_gather(jax.lax.stop_gradient(s), AXIS, tiled=True),
                                       layouts[n]))
                    for n, s in shards.items()}
            loss, full_grads = jax.value_and_grad(zero2_loss)(full, x, y)
            grads = {n: jax.lax.psum_scatter(_pad_flat(g, layouts[n]), AXIS, tiled=True) / world
                     for n, g in full_grads.items()}
        new_shards, new_state = optim.update(optimizer, shards, grads, opt_state)
        return new_shards, new_state, jax.lax.pmean(loss, AXIS), grads

    sharded, replicated = P(AXIS), P()
    state_spec = jax.tree_util.tree_map(lambda _: sharded, optim.init(optimizer, {n: 0.0 for n in layouts}))
    state_spec["step"] = replicated
    step = jax.shard_map(local_step, mesh=mesh,
                         in_specs=(sharded, state_spec, sharded, sharded),
                         out_specs=(sharded, state_spec, replicated, sharded))
    return jax.jit(step)


def init_opt_state(optimizer: str, shards: dict, mesh) -> dict:
    state = optim.init(optimizer, shards)
    state["step"] = jax.device_put(state["step"], NamedSharding(mesh, P()))
    return state
