"""SGD with momentum and AdamW, with torch's formulas (not optax's defaults).

They act elementwise on flat shards, so they run on each rank's shard
unchanged; zero padding stays zero (its gradient is zero, and weight decay
of zero is zero).
"""

from __future__ import annotations

import jax.numpy as jnp

from ..crosscheck.models import ADAMW, SGD


def init(name: str, params: dict) -> dict:
    zeros = {k: jnp.zeros_like(v) for k, v in params.items()}
    if name == "sgd":
        return {"step": jnp.zeros((), jnp.int32), "momentum": zeros}
    return {"step": jnp.zeros((), jnp.int32), "exp_avg": zeros,
            "exp_avg_sq": {k: jnp.zeros_like(v) for k, v in params.items()}}


def update(name: str, params: dict, grads: dict, state: dict) -> tuple[dict, dict]:
    step = state["step"] + 1
    if name == "sgd":
        lr, mu = SGD["lr"], SGD["momentum"]
        # torch: the first step's buffer is the gradient itself.
        buf = {k: jnp.where(step == 1, grads[k], mu * state["momentum"][k] + grads[k]) for k in params}
        return {k: params[k] - lr * buf[k] for k in params}, {"step": step, "momentum": buf}
    lr, (b1, b2), eps, wd = ADAMW["lr"], ADAMW["betas"], ADAMW["eps"], ADAMW["weight_decay"]
    t = step.astype(jnp.float32)
    bias1, bias2 = 1 - b1 ** t, 1 - b2 ** t
    new, m_all, v_all = {}, {}, {}
    for k, p in params.items():
        p = p * (1 - lr * wd)
        m = state["exp_avg"][k] + (grads[k] - state["exp_avg"][k]) * (1 - b1)  # torch: lerp_
        v = state["exp_avg_sq"][k] * b2 + grads[k] * grads[k] * (1 - b2)
        denom = jnp.sqrt(v) / jnp.sqrt(bias2) + eps
        new[k], m_all[k], v_all[k] = p - (lr / bias1) * m / denom, m, v
    return new, {"step": step, "exp_avg": m_all, "exp_avg_sq": v_all}
