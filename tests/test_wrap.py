"""Auto-wrap policies: torch_xla's names, arguments and answers."""

import functools

import torch.nn as nn

from xla_fsdp import XlaFullyShardedDataParallel as FSDP
from xla_fsdp.testing import run_on_cpu_devices
from xla_fsdp.wrap import (always_wrap_policy, lambda_auto_wrap_policy, size_based_auto_wrap_policy,
                           transformer_auto_wrap_policy)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2)
        self.layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
        self.head = nn.Sequential(nn.Linear(8, 4), nn.Tanh())

    def forward(self, x):
        x = self.attention(x, x, x)[0]
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _units(policy) -> list[str]:
    """Names of the nested units FSDP makes of ``Model`` with ``policy``."""
    def wrap(rank):
        model = FSDP(Model(), auto_wrap_policy=policy)
        return sorted(name.replace("_fsdp_wrapped_module.", "") for name, m in model.named_modules()
                      if isinstance(m, FSDP) and m is not model)
    return run_on_cpu_devices(wrap, 1)[0]


def test_always_wrap_policy_says_yes_to_everything():
    assert always_wrap_policy(module=nn.Linear(1, 1), recurse=False, unwrapped_params=0)
    assert always_wrap_policy(module=nn.Linear(1, 1), recurse=True, unwrapped_params=0)


def test_always_wrap_policy_wraps_every_submodule_with_a_forward():
    units = _units(always_wrap_policy)
    assert "layers.0" in units and "layers.1" in units and "head" in units and "attention" in units
    assert "layers" not in units  # a ModuleList has no forward


def test_lambda_auto_wrap_policy_wraps_what_the_function_selects():
    policy = functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda m: type(m) is nn.Linear)
    assert policy(module=nn.Tanh(), recurse=True, unwrapped_params=0)
    assert not policy(module=nn.Tanh(), recurse=False, unwrapped_params=0)
    assert _units(policy) == ["head.0", "layers.0", "layers.1"]


def test_size_based_policy_takes_none_for_its_module_sets_as_torch_xla_does():
    policy = functools.partial(size_based_auto_wrap_policy, min_num_params=10, force_leaf_modules=None,
                               exclude_wrap_modules=None)
    assert not policy(module=nn.MultiheadAttention(8, 2), recurse=True, unwrapped_params=1000)
    assert not policy(module=nn.ModuleList([nn.Linear(8, 8)]), recurse=False, unwrapped_params=1000)
    assert policy(module=nn.Linear(8, 8), recurse=False, unwrapped_params=72)
    assert not policy(module=nn.Linear(2, 2), recurse=False, unwrapped_params=6)
    assert nn.MultiheadAttention in size_based_auto_wrap_policy.FORCE_LEAF_MODULES
    assert nn.ModuleList in size_based_auto_wrap_policy.EXCLUDE_WRAP_MODULES


def test_transformer_policy_wraps_the_layer_classes():
    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={nn.Sequential})
    assert _units(policy) == ["head"]
