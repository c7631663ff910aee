"""Each constructor option changes what it says it changes.

Options that shape the step graph are checked in the HLO that rank 0 traces
for one step on 2 devices (``step_hlo``); the others by their effect.
"""

import pytest
import torch
import torch.nn as nn
import torch_xla

from support import Config, count_ops, make_net, step_hlo
from xla_fsdp import XlaFullyShardedDataParallel as FSDP
from xla_fsdp._collectives import ShardingGroup
from xla_fsdp._param_group import MAX_COLLECTIVES_PER_OP
from xla_fsdp.testing import run_on_cpu_devices


def hlo(**options) -> str:
    wrap = options.pop("wrap", "zero3")
    return step_hlo(2, Config(wrap=wrap, fsdp=tuple(options.items())))


def test_reshard_after_forward_regathers_nested_units_in_backward():
    # Root (never resharded) + 2 blocks: 3 gathers without resharding, 5 with.
    assert count_ops(hlo(reshard_after_forward=True), "all-gather") == 5
    assert count_ops(hlo(reshard_after_forward=False), "all-gather") == 3


def test_disable_reshard_on_root_false_regathers_the_root_too():
    root_only = dict(wrap="zero2", reshard_after_forward=True)
    assert count_ops(hlo(**root_only, disable_reshard_on_root=True), "all-gather") == 1
    assert count_ops(hlo(**root_only, disable_reshard_on_root=False), "all-gather") == 2


def test_one_reduce_scatter_per_unit_and_buckets_split_it():
    assert count_ops(hlo(), "reduce-scatter") == 3
    # 1e-5 MB = 10 bytes: each bucket carries at most one column of the 2-rank gradient.
    assert count_ops(hlo(reduce_scatter_bucket_size_mb=1e-5), "reduce-scatter") > 100


def test_gradients_of_a_flat_shard_are_concatenated_not_padded_per_parameter():
    # [Note: one full tensor per original parameter]: slicing the flat full
    # tensor under autograd would pad each parameter's gradient to the flat
    # size (one pad per parameter of the unit) and add them all up.
    assert count_ops(hlo(wrap="zero2"), "pad") == 0
    assert count_ops(hlo(wrap="zero2"), "concatenate") >= 1


def test_unflattened_parameters_have_their_own_collectives():
    # [Note: collectives of a unit]: 17 parameters, 2 of them frozen (no gradient to reduce).
    unflat = hlo(flatten_parameters=False, reshard_after_forward=False)
    assert count_ops(unflat, "all-gather") == 17
    assert count_ops(unflat, "reduce-scatter") == 15


def test_a_bucket_size_that_needs_too_many_reduce_scatters_is_refused():
    def backward(rank):
        model = FSDP(nn.Linear(256, 256), flatten_parameters=True, reduce_scatter_bucket_size_mb=1e-6)
        model(torch.ones(2, 256).to(torch_xla.device())).sum().backward()

    with pytest.raises(ValueError, match=r"buckets of 1 bytes \(reduce_scatter_bucket_size_mb\) split the gradients "
                                         r"of \['flat_param_0'\]"):
        run_on_cpu_devices(backward, 2)


def test_an_unflattened_unit_with_too_many_parameters_is_refused():
    # Each parameter of an unflattened unit has its own channel ids; more than
    # MAX_COLLECTIVES_PER_OP would run into the next op's.
    class Many(nn.Module):
        def __init__(self):
            super().__init__()
            self.ps = nn.ParameterList(nn.Parameter(torch.zeros(1)) for _ in range(MAX_COLLECTIVES_PER_OP + 1))

        def forward(self, x):
            return x + sum(self.ps)

    def wrap(rank):
        FSDP(Many(), flatten_parameters=False)

    with pytest.raises(ValueError, match=rf"flatten_parameters=False has {MAX_COLLECTIVES_PER_OP + 1} parameters "
                                         r"\(first: 'ps.0'\)"):
        run_on_cpu_devices(wrap, 2)


def test_optimization_barriers_follow_their_options():
    both = count_ops(hlo(), "opt-barrier")
    forward_only = count_ops(hlo(optimization_barrier_in_backward=False), "opt-barrier")
    backward_only = count_ops(hlo(optimization_barrier_in_forward=False), "opt-barrier")
    none = count_ops(hlo(optimization_barrier_in_forward=False, optimization_barrier_in_backward=False),
                     "opt-barrier")
    assert none == 0
    assert 0 < forward_only < both and 0 < backward_only < both


def test_compute_dtype_gathers_in_bf16_and_fp32_reduce_scatter_reduces_in_fp32():
    bf16 = hlo(compute_dtype=torch.bfloat16)
    lines = [line for line in bf16.splitlines() if " reduce-scatter(" in line]
    assert lines and all("bf16[" in line.split("=")[1] for line in lines)
    assert all("bf16[" in line.split("=")[1] for line in bf16.splitlines() if " all-gather(" in line)
    fp32 = hlo(compute_dtype=torch.bfloat16, fp32_reduce_scatter=True)
    lines = [line for line in fp32.splitlines() if " reduce-scatter(" in line]
    assert lines and all("f32[" in line.split("=")[1] for line in lines)


def test_flatten_parameters_names_flat_or_original_shards():
    def names(rank, flatten):
        return [n for n, _ in FSDP(make_net(), flatten_parameters=flatten).named_parameters()]

    assert run_on_cpu_devices(names, 2, True)[0] == ["flat_param_0", "flat_param_1"]
    unflat = run_on_cpu_devices(names, 2, False)[0]
    assert "_fsdp_shard__blocks__0__fc1__weight" in unflat and len(unflat) == 17


def test_shard_param_on_dim_0_keeps_rows_together():
    def shapes(rank):
        model = FSDP(make_net(), flatten_parameters=False, shard_param_on_dim_0=True)
        return {n: tuple(p.shape) for n, p in model.named_parameters()}

    shapes = run_on_cpu_devices(shapes, 4)[0]
    assert shapes["_fsdp_shard__blocks__0__fc1__weight"] == (2, 15)   # (7, 15) -> ceil(7/4) rows
    assert shapes["_fsdp_shard__head"] == (4, 3)                      # (15, 3) -> 4 rows


def test_buffer_dtype_casts_floating_buffers():
    def dtype(rank, **kwargs):
        return FSDP(make_net(), **kwargs).module.scale.dtype

    assert run_on_cpu_devices(dtype, 1)[0] == torch.float32
    assert run_on_cpu_devices(lambda r: dtype(r, compute_dtype=torch.bfloat16), 1)[0] == torch.bfloat16
    assert run_on_cpu_devices(
        lambda r: dtype(r, compute_dtype=torch.bfloat16, buffer_dtype=torch.float32), 1)[0] == torch.float32


def test_pin_layout_is_kept_on_one_device_and_forced_off_across_cpu_devices():
    assert run_on_cpu_devices(lambda r: ShardingGroup.create(pin_layout=True).pin_layout, 1)[0] is True
    assert run_on_cpu_devices(lambda r: ShardingGroup.create(pin_layout=True).pin_layout, 2) == [False, False]
    assert run_on_cpu_devices(lambda r: ShardingGroup.create(pin_layout=False).pin_layout, 1)[0] is False


@pytest.mark.parametrize("execute", [True, False])
def test_execute_sharding_on_init_runs_the_sharding_graph(execute):
    def pending_ops(rank):
        model = make_net().to(torch_xla.device())
        torch_xla.sync()
        shards = list(FSDP(model, execute_sharding_on_init=execute).parameters())
        # Executed shards are plain device data; unexecuted ones still carry the sharding ops.
        ir = torch_xla._XLAC._get_xla_tensors_text(shards)
        return [line for line in ir.splitlines() if " = " in line and "xla::device_data()" not in line]

    pending = run_on_cpu_devices(pending_ops, 1)[0]
    assert (pending == []) == execute, pending[:3]


def test_sharding_arguments_must_come_together():
    with pytest.raises(ValueError, match="must be given together"):
        run_on_cpu_devices(lambda r: FSDP(make_net(), sharding_groups=[[0, 1]]), 2)


class NoReset(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.empty(2, device="meta"))

    def forward(self, x):
        return x * self.w


def test_misuse_gets_clear_errors():
    def check(rank):
        with pytest.raises(ValueError, match="already wrapped"):
            FSDP(FSDP(nn.Linear(2, 2)))
        with pytest.raises(TypeError, match="ModuleList"):
            FSDP(nn.ModuleList([nn.Linear(2, 2)]))
        int_module = nn.Linear(2, 2)
        int_module.steps = nn.Parameter(torch.zeros(2, dtype=torch.int64), requires_grad=False)
        with pytest.raises(TypeError, match="'steps' has dtype torch.int64"):
            FSDP(int_module)
        with pytest.raises(ValueError, match="requires flatten_parameters=False"):
            FSDP(nn.Linear(2, 2), flatten_parameters=True, shard_param_on_dim_0=True)
        with pytest.raises(ValueError, match="compute_dtype"):
            FSDP(nn.Linear(2, 2), compute_dtype=torch.int32)
        with pytest.raises(ValueError, match=r"submodule '0' \(NoReset\) has tensors on the meta device"):
            FSDP(nn.Sequential(NoReset()))
        return True

    assert run_on_cpu_devices(check, 1) == [True]
