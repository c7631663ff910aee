"""Sharded training equals unsharded training, at world sizes 1, 2, 4 and 8.

Reference: the same ``Net`` (odd shapes, a tied, a frozen parameter and a
buffer), unsharded on one XLA device, trained on the whole global batch from
the same weights. Losses of every step and every parameter after the last step
must match to PyTorch's fp32 defaults.
"""

import functools

import pytest
import torch

from support import FP32, Block, Config, assert_state_close, make_batches, make_net, run_fsdp, run_reference
from xla_fsdp._collectives import ShardingGroup

WORLD_SIZES = [1, 2, 4, 8]

WRAPPINGS = {
    "zero2": Config(wrap="zero2"),
    "zero3_manual": Config(wrap="zero3"),
    "zero3_auto_size": Config(wrap="size"),
    "zero3_auto_layer": Config(wrap="layer"),
    "zero3_checkpoint": Config(wrap="zero3", checkpoint=True),
    "zero2_checkpoint": Config(wrap="zero2", checkpoint=True),
    "zero3_unflattened": Config(wrap="zero3", fsdp=(("flatten_parameters", False),)),
    "zero3_dim0": Config(wrap="layer", fsdp=(("flatten_parameters", False), ("shard_param_on_dim_0", True))),
}


def assert_matches_reference(config: Config, world: int) -> None:
    result = run_fsdp(world, config)
    reference = run_reference(config)
    torch.testing.assert_close(result.losses, reference.losses, **FP32)
    assert_state_close(result.params, reference.params, **FP32)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("wrapping", list(WRAPPINGS))
@pytest.mark.parametrize("world", WORLD_SIZES)
def test_training_matches_unsharded_reference(world, wrapping, optimizer):
    assert_matches_reference(WRAPPINGS[wrapping].replace(optimizer=optimizer), world)


@pytest.mark.parametrize("world", [2, 4, 8])
def test_untokened_reduce_scatters_match_unsharded_reference(world, monkeypatch):
    # Net's odd shapes pad every unflattened gradient, and a padded gradient is
    # reduce-scattered in torch_xla's token chain. With shapes every world size
    # divides, each gradient is reduce-scattered as autograd made it, outside
    # the chain ([Note: the collective token]).
    untokened = []
    original = ShardingGroup.reduce_scatter_mean

    def spy(self, flat, channel_id, *args, tokened=True, **kwargs):
        untokened.append(not tokened)
        return original(self, flat, channel_id, *args, tokened=tokened, **kwargs)

    monkeypatch.setattr(ShardingGroup, "reduce_scatter_mean", spy)
    config = Config(wrap="zero3", fsdp=(("flatten_parameters", False), ("untokened_reduce_scatter", True)))
    # SGD: AdamW hides a gradient scale.
    batches = make_batches(config.steps, d_in=16)
    model_fn = functools.partial(make_net, d_in=16, d_hid=8)
    result = run_fsdp(world, config, batches, model_fn=model_fn)
    assert untokened and all(untokened), "every reduce-scatter must take the untokened path"
    reference = run_fsdp(1, config.replace(wrap="none", fsdp=()), batches, model_fn=model_fn)
    torch.testing.assert_close(result.losses, reference.losses, **FP32)
    assert_state_close(result.params, reference.params, **FP32)


@pytest.mark.parametrize("world", [2, 4, 8])
def test_clip_grad_norm_equals_unsharded_clip(world):
    config = Config(wrap="zero3", clip=0.5)
    result, reference = run_fsdp(world, config), run_reference(config)
    assert max(reference.grad_norms) > 0.5, "the test must actually clip"
    torch.testing.assert_close(result.grad_norms, reference.grad_norms, **FP32)
    assert_state_close(result.params, reference.params, **FP32)


@pytest.mark.parametrize("world", [2, 4])
def test_no_sync_accumulation_equals_one_large_batch(world):
    config = Config(wrap="zero3", micro_batches=2, optimizer="adamw")
    result, reference = run_fsdp(world, config), run_reference(config)
    torch.testing.assert_close(result.losses, reference.losses, **FP32)
    assert_state_close(result.params, reference.params, **FP32)


def test_checkpointing_recomputes_each_block_in_backward():
    steps = 3
    for checkpoint, runs_per_step in ((False, 1), (True, 2)):
        Block.forward_calls = 0
        run_fsdp(2, Config(wrap="zero3", checkpoint=checkpoint, steps=steps))
        # 2 blocks x 2 ranks x steps forwards, twice when recomputed in backward.
        assert Block.forward_calls == 2 * 2 * steps * runs_per_step
