"""FSDP in JAX: shards on a one-axis mesh, and the ZeRO-2 / ZeRO-3 training step.

Shard layout, derived here on its own: the cross-check compares shards element
by element, so if this module used xla_fsdp's layout code a layout bug there
would shift both sides alike and go unseen. A *unit* is a list of parameters
sharded together. Its flat value is the concatenation of its parameters, each
flattened row-major (torch's element order: the models keep torch's parameter
layouts), in the unit's order; zero-padded at the end to a multiple of the
world size and cut into world-size equal contiguous pieces, device r holding
piece r (``UnitLayout``). A sharded unit is a global array of shape
``(padded_numel,)`` with ``PartitionSpec("fsdp")``, keyed by its first
parameter's name. ``plan_units`` says which parameters form a unit, as FSDP
wraps them: with ``flatten=False`` every parameter alone; with
``flatten=True`` every parameter of one wrapped module in registration order,
i.e. one layer under ZeRO-3 (each layer is a unit) and the whole model under
ZeRO-2 (the root is the only unit).

ZeRO-3: each layer all-gathers its units (``all_gather(..., tiled=True)``)
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
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import NamedSharding, PartitionSpec as P

from . import optim
from ..crosscheck.models import TINY, Size
from .models import cross_entropy, layers

AXIS = "fsdp"


@dataclass(frozen=True)
class UnitLayout:
    """Where a unit's parameters lie in its padded flat value (see the module docstring)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    world_size: int

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(shape) for shape in self.shapes)

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    @property
    def padded_numel(self) -> int:
        return -(-self.numel // self.world_size) * self.world_size

    def pack(self, values: dict, xp=jnp):
        """Named values -> one zero-padded flat array (numpy with ``xp=np``)."""
        flat = xp.concatenate([xp.reshape(values[n], (-1,)) for n in self.names])
        return xp.pad(flat, (0, self.padded_numel - self.numel))

    def unpack(self, flat) -> dict:
        """Padded flat array (all shards in rank order) -> named values of their shapes."""
        out, start = {}, 0
        for name, shape, size in zip(self.names, self.shapes, self.sizes):
            out[name] = flat[start:start + size].reshape(shape)
            start += size
        return out


def plan_units(names: list[str], *, zero: int, flatten: bool) -> list[tuple[str, ...]]:
    """Which parameters (given in registration order) are sharded together."""
    if not flatten:
        return [(name,) for name in names]
    if zero == 2:
        return [tuple(names)]
    by_layer: dict[str, list[str]] = {}
    for name in names:
        by_layer.setdefault(".".join(name.split(".")[:2]), []).append(name)   # "layers.<i>"
    return [tuple(members) for members in by_layer.values()]


def make_mesh(world_size: int) -> jax.sharding.Mesh:
    devices = jax.devices()
    if len(devices) < world_size:
        raise ValueError(f"JAX sees {len(devices)} devices, need {world_size}: set "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={world_size} before importing jax")
    return jax.sharding.Mesh(np.array(devices[:world_size]), (AXIS,))


def shard_params(full: dict[str, np.ndarray], mesh, units: list[tuple[str, ...]] | None = None
                 ) -> tuple[dict, dict[str, UnitLayout]]:
    """Full numpy parameters -> one sharded padded flat array per unit, and the units' layouts.

    ``units`` defaults to every parameter alone (``flatten_parameters=False``).
    """
    world = mesh.devices.size
    sharding = NamedSharding(mesh, P(AXIS))
    layouts, sharded = {}, {}
    for members in units or [(name,) for name in full]:
        layout = UnitLayout(tuple(members), tuple(tuple(full[n].shape) for n in members), world)
        layouts[members[0]] = layout
        sharded[members[0]] = jax.device_put(layout.pack(full, xp=np), sharding)
    return sharded, layouts


def unshard(sharded: dict, layouts: dict[str, UnitLayout]) -> dict[str, np.ndarray]:
    full = {}
    for key, flat in sharded.items():
        full.update(layouts[key].unpack(np.asarray(flat)))
    return full


def _varying(x):
    """``x`` typed as varying over the mesh axis (see the pitfall in the module docstring).

    JAX 0.10 already types an all-gather's output as varying; a value that is
    invariant (replicated) is cast, so its gradient is not summed implicitly.
    """
    return x if AXIS in jax.typeof(x).manual_axis_type.varying else jax.lax.pcast(x, AXIS, to="varying")


def make_train_step(model: str, layouts: dict[str, UnitLayout], mesh, *, zero: int, optimizer: str,
                    grad_ckpt: bool, size: Size = TINY):
    """A jitted ``step(shards, opt_state, x, y) -> (shards, opt_state, loss, grad_shards)``."""
    world = mesh.devices.size
    model_layers = layers(model, size)
    # The units of each layer; under ZeRO-3 a layer gathers exactly these.
    units_of = [[key for key, layout in layouts.items() if all(n.startswith(prefix) for n in layout.names)]
                for prefix, _ in model_layers]
    spanning = set(layouts) - {key for keys in units_of for key in keys}
    if zero == 3 and spanning:
        raise ValueError(f"ZeRO-3 gathers one layer at a time, but units {sorted(spanning)} span layers")

    def run_layer(i, params, x):
        prefix, apply = model_layers[i]
        return apply({n[len(prefix):]: v for n, v in params.items() if n.startswith(prefix)}, x)

    def zero3_loss(shards, x, y):
        h = x
        for i in range(len(model_layers)):
            def layer(local, h, i=i):
                full = {}
                for key in units_of[i]:
                    gathered = layouts[key].unpack(jax.lax.all_gather(local[key], AXIS, tiled=True))
                    full.update({n: checkpoint_name(v, "gathered") for n, v in gathered.items()})
                return run_layer(i, full, h)
            policy = (jax.checkpoint_policies.nothing_saveable if grad_ckpt
                      else jax.checkpoint_policies.save_anything_except_these_names("gathered"))
            h = jax.checkpoint(layer, policy=policy)({key: shards[key] for key in units_of[i]}, h)
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
            grads = {key: g / world for key, g in grads.items()}   # gather's transpose sums; average
        else:
            full = {}
            for key, shard in shards.items():
                gathered = jax.lax.all_gather(jax.lax.stop_gradient(shard), AXIS, tiled=True)
                full.update({n: _varying(v) for n, v in layouts[key].unpack(gathered).items()})
            loss, full_grads = jax.value_and_grad(zero2_loss)(full, x, y)
            grads = {key: jax.lax.psum_scatter(layout.pack(full_grads), AXIS, tiled=True) / world
                     for key, layout in layouts.items()}
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
