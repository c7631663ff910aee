"""Mixed precision, sharding groups, memory, compilation, meta init and state dicts."""

import functools

import pytest
import torch
import torch.nn as nn
import torch_xla

from support import (D_IN, FP32, GLOBAL_BATCH, N_CLASSES, Config, Net, assert_state_close, compile_count,
                     device_buffer_keys, init_weights, live_device_tensors, make_batches, make_net, run_fsdp,
                     tensor_bytes, train_rank)
from xla_fsdp import XlaFullyShardedDataParallel as FSDP
from xla_fsdp._state_dict import unshard_state_dicts
from xla_fsdp.testing import run_on_cpu_devices

# bf16 keeps 8 mantissa bits (relative rounding 2**-8 ~ 3.9e-3 per op), and the
# autocast reference runs some ops (layer norm, the loss) in fp32 where FSDP's
# compute_dtype runs the whole module in bf16. Over 5 AdamW steps of lr 0.02
# losses agree to ~2e-3 relative and parameters to ~4e-3 absolute (measured);
# the tolerance allows 2.5x that, far below the lr-sized moves of a real bug.
BF16 = dict(rtol=1e-2, atol=1e-2)


def test_bf16_compute_with_fp32_master_shards_matches_autocast_reference():
    config = Config(wrap="zero3", optimizer="adamw", fsdp=(("compute_dtype", torch.bfloat16),))
    result = run_fsdp(4, config)
    reference = run_fsdp(1, config.replace(wrap="none", fsdp=(), autocast_bf16=True))
    torch.testing.assert_close(result.losses, reference.losses, **BF16)
    assert_state_close(result.params, reference.params, **BF16)
    shards = run_on_cpu_devices(
        lambda r: {p.dtype for p in FSDP(make_net(), compute_dtype=torch.bfloat16).parameters()}, 2)
    assert shards == [{torch.float32}, {torch.float32}]


@pytest.mark.parametrize("flatten, width", [(True, 15), (False, 16)])
def test_two_sharding_groups_train_like_two_independent_runs(flatten, width):
    # Widths 16 and 8, unflattened: every reduce-scatter is untokened ([Note: the collective token]).
    config = Config(wrap="zero3", fsdp=(("flatten_parameters", flatten), ("untokened_reduce_scatter", True)))
    batches = [make_batches(config.steps, seed=10, d_in=width), make_batches(config.steps, seed=20, d_in=width)]
    model_fn = functools.partial(make_net, d_in=width, d_hid=width // 2)

    def grouped(rank):
        group = dict(sharding_groups=[[0, 1], [2, 3]], sharding_rank=rank % 2, sharding_world_size=2)
        return train_rank(rank, 4, config, batches[rank // 2], model_fn=model_fn, group_kwargs=group)

    results = run_on_cpu_devices(grouped, 4)
    for group, batch in enumerate(batches):
        alone = run_fsdp(2, config, batches=batch, model_fn=model_fn)
        assert_state_close(results[2 * group].params, alone.params, **FP32)
        assert results[2 * group].params.keys() == results[2 * group + 1].params.keys()
    assert not torch.equal(results[0].params["head"], results[2].params["head"])


def test_zero3_keeps_only_shards_between_steps():
    world = 4

    alive_before: dict[str, set] = {}  # by device: what earlier tests left alive

    def probe(step, model, opt, extra):
        # Every tensor alive on this rank's device, wherever it is held: a full
        # parameter kept anywhere would be counted.
        device = torch_xla.device()
        extra["bytes"] = tensor_bytes(live_device_tensors(device, since=alive_before[str(device)]))
        extra["padding"] = sum(sp.layout.padding for unit in model.modules() if isinstance(unit, FSDP)
                               for sp in unit._params.sharded)
        extra["leftover_full_params"] = [name for name, m in model.named_modules()
                                         for attr in ("weight", "bias", "head")
                                         if attr in vars(m) and vars(m)[attr].numel() > 0]  # not a placeholder

    def train(rank):
        alive_before[str(torch_xla.device())] = device_buffer_keys(torch_xla.device())
        return train_rank(rank, world, Config(wrap="zero3", optimizer="adamw", steps=2), make_batches(2),
                          probe=probe)

    results = run_on_cpu_devices(train, world)
    net = make_net()
    full_numel = sum(p.numel() for p in net.parameters())
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    bytes_per = 4
    # parameters + gradients + AdamW's exp_avg and exp_avg_sq (trainable only).
    unsharded = bytes_per * (full_numel + 3 * trainable)
    # Also alive in train_rank when the probe runs: the (replicated) buffers, the
    # rank's inputs, labels (int64) and logits, and the loss scalars.
    per_rank = GLOBAL_BATCH // world
    loop = (sum(b.numel() for b in net.buffers()) * bytes_per
            + per_rank * (D_IN * bytes_per + 8 + N_CLASSES * bytes_per) + 2 * bytes_per)
    for result in results:
        extra = result.extra
        limit = 1.02 * unsharded / world + bytes_per * 4 * extra["padding"] / world + loop
        assert extra["bytes"] <= limit, (extra["bytes"], limit)
        assert extra["leftover_full_params"] == []


def test_steady_state_steps_do_not_recompile():
    def probe(step, model, opt, extra):
        if step == 1:
            extra["after_step_2"] = compile_count()
        extra["last"] = compile_count()

    for wrap, checkpoint in (("zero2", False), ("zero3", False), ("zero3", True)):
        config = Config(wrap=wrap, checkpoint=checkpoint, optimizer="adamw", steps=5)
        results = run_on_cpu_devices(lambda r: train_rank(r, 4, config, make_batches(5), probe=probe), 4)
        assert results[0].extra["after_step_2"] > 0
        assert results[0].extra["last"] == results[0].extra["after_step_2"], (wrap, checkpoint)


def test_meta_device_model_with_param_init_fn_trains_like_a_normal_one():
    def materialise(module):
        module.to_empty(device="cpu")
        module.tie_weights()
        init_weights(module)
        module.scale.copy_(torch.linspace(0.5, 1.5, module.scale.numel()))

    def build_on_meta():
        with torch.device("meta"):
            return Net()

    config = Config(wrap="zero2", fsdp=(("param_init_fn", materialise),))
    meta = run_fsdp(2, config, model_fn=build_on_meta)
    normal = run_fsdp(2, Config(wrap="zero2"))
    torch.testing.assert_close(meta.losses, normal.losses, rtol=0, atol=0)
    assert_state_close(meta.params, normal.params, rtol=0, atol=0)


def test_rank_state_dicts_and_metadata_rebuild_the_full_state_dict():
    def save(rank):
        model = FSDP(nn.Sequential(FSDP(make_net()), nn.Linear(3, 2)), flatten_parameters=False)
        return ({k: v.cpu() for k, v in model.state_dict().items()}, model.get_shard_metadata(),
                model.full_state_dict())

    results = run_on_cpu_devices(save, 4)
    full = unshard_state_dicts([r[0] for r in results], results[0][1])
    assert_state_close(full, results[0][2], rtol=0, atol=0)
    expected = {f"0.{k}": v for k, v in make_net().state_dict().items()}
    assert_state_close({k: v for k, v in full.items() if k.startswith("0.")}, expected, rtol=0, atol=0)
    assert results[1][2] == {}  # full_state_dict is for rank 0 only by default


def test_load_state_dict_restores_a_fresh_wrapped_model():
    def roundtrip(rank):
        source = FSDP(init_weights(Net(), seed=5))
        target = FSDP(make_net())
        target.load_state_dict(source.state_dict())
        return ({k: v.cpu() for k, v in target.state_dict().items()},
                {k: v.cpu() for k, v in source.state_dict().items()})

    for loaded, saved in run_on_cpu_devices(roundtrip, 2):
        assert_state_close(loaded, saved, rtol=0, atol=0)
