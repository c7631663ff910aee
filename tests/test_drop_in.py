"""The torch_xla drop-in surface: constructor, defaults, forwarding, and the methods torch_xla users call."""

import inspect

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_xla
from torch_xla.distributed.fsdp import XlaFullyShardedDataParallel as TorchXlaFSDP

from support import Config, count_ops, make_batches, make_net, step_hlo
from xla_fsdp import XlaFullyShardedDataParallel as FSDP
from xla_fsdp.testing import run_on_cpu_devices


def _init_params(cls) -> dict[str, inspect.Parameter]:
    params = dict(inspect.signature(cls.__init__).parameters)
    params.pop("self")
    return params


def test_constructor_takes_torch_xla_arguments_in_its_order_with_its_defaults():
    ours, theirs = _init_params(FSDP), _init_params(TorchXlaFSDP)
    assert list(ours)[:len(theirs)] == list(theirs)
    assert {name: ours[name].default for name in theirs} == {name: p.default for name, p in theirs.items()}


def test_options_may_be_given_positionally_as_in_torch_xla():
    def options(rank):
        model = FSDP(nn.Linear(4, 4), False, True)  # reshard_after_forward, flatten_parameters
        return model.reshard_after_forward, model.flatten_parameters, [n for n, _ in model.named_parameters()]

    assert run_on_cpu_devices(options, 1)[0] == (False, True, ["flat_param_0"])


def test_sync_on_finalization_executes_the_gradients_at_the_end_of_backward():
    def pending_after_backward(rank, sync):
        model = FSDP(make_net(), sync_on_finalization=sync)
        x, y = make_batches(1)[0]
        F.cross_entropy(model(x.to(torch_xla.device())), y.to(torch_xla.device())).backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        ir = torch_xla._XLAC._get_xla_tensors_text(grads)
        return [line for line in ir.splitlines() if " = " in line and "xla::device_data()" not in line]

    assert run_on_cpu_devices(pending_after_backward, 2, True) == [[], []]
    assert all(run_on_cpu_devices(pending_after_backward, 2, False))


def test_coalesce_all_gather_ops_gathers_an_unflattened_unit_in_one_collective():
    def gathers(coalesce):
        config = Config(wrap="zero2", fsdp=(("flatten_parameters", False), ("coalesce_all_gather_ops", coalesce)))
        return count_ops(step_hlo(2, config), "all-gather")

    assert gathers(True) == 1
    assert gathers(False) == len(list(make_net().parameters()))


def test_private_torch_xla_options_are_accepted_at_their_defaults_and_refused_otherwise():
    def check(rank):
        FSDP(nn.Linear(4, 4), _shard_size_multiple=128, _use_xla_patched_linear=True, _debug_msg="run 1",
             _debug_print=False, _debug_dummy_forward_pass=False, _debug_dummy_all_gather_op=False,
             _debug_dummy_all_reduce_op=False, _debug_dummy_reduce_scatter_op=False,
             _debug_dummy_optimization_barrier_op=False)
        for name, value in (("_shard_size_multiple", 1), ("_debug_print", True),
                            ("_debug_dummy_all_gather_op", True), ("_debug_dummy_forward_pass", True)):
            with pytest.raises(ValueError, match=f"{name}={value!r} is not supported"):
                FSDP(nn.Linear(4, 4), **{name: value})
        return True

    assert run_on_cpu_devices(check, 1) == [True]


def test_use_xla_patched_linear_leaves_nn_linear_alone():
    # torch_xla swaps nn.Linear's forward for a custom autograd Function so that
    # backward does not save weight.t(); our resharding hooks handle views
    # already ([Note: resharding after forward]), so nothing is patched.
    def forwards(rank):
        model = FSDP(nn.Sequential(nn.Linear(4, 4)), _use_xla_patched_linear=True)
        return type(model.module[0]).forward is nn.Linear.forward and "forward" not in vars(model.module[0])

    assert run_on_cpu_devices(forwards, 1) == [True]


def test_attributes_and_items_reach_the_wrapped_module():
    class WithConfig(nn.Sequential):
        config = {"hidden": 4}

    def look(rank):
        model = FSDP(WithConfig(nn.Linear(4, 4), nn.ReLU()))
        return model.config, type(model[1]).__name__, type(model.module[0]).__name__

    assert run_on_cpu_devices(look, 1)[0] == ({"hidden": 4}, "ReLU", "Linear")


def test_full_params_exist_only_while_the_unit_computes():
    seen = {}

    def probe(rank):
        inner = nn.Linear(4, 3)
        model = FSDP(nn.Sequential(inner))
        inner.register_forward_hook(lambda *_: seen.setdefault(rank, (model.has_full_params,
                                                                       [tuple(t.shape) for t in model.full_params])))
        before = (model.has_full_params, model.full_params)
        model(torch.ones(2, 4, device=torch_xla.device()))
        after = (model.has_full_params, model.full_params)
        return before, after

    before, after = run_on_cpu_devices(probe, 2)[0]
    assert before == (False, []) and after == (False, [])
    assert seen[0] == (True, [(3, 4), (3,)])


def test_params_with_grad_lists_the_shards_that_got_a_gradient():
    def check(rank):
        model = FSDP(make_net())
        assert model.params_with_grad == []
        x, y = make_batches(1)[0]
        F.cross_entropy(model(x.to(torch_xla.device())), y.to(torch_xla.device())).backward()
        return sorted(id(p) for p in model.params_with_grad) == sorted(
            id(p) for p in model.parameters() if p.grad is not None), len(model.params_with_grad)

    (same, count), _ = run_on_cpu_devices(check, 2)
    assert same and count > 0


def test_original_names_pair_each_shard_with_the_unwrapped_name():
    def names(rank):
        net = make_net()
        net.blocks[0] = FSDP(net.blocks[0])
        model = FSDP(net)
        return [(name, tuple(p.shape)) for name, p in model.get_original_names_and_sharded_parameters()]

    pairs = run_on_cpu_devices(names, 2)[0]
    trainable_and_frozen = {n for n, _ in make_net().named_parameters()}
    assert {n for n, _ in pairs} == trainable_and_frozen
    assert dict(pairs)["blocks.0.fc1.weight"] == (53,)   # 7 * 15 = 105 elements, ceil(105 / 2)
