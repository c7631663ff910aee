"""CPU offload: shards, gradients and optimizer state on the host; parity with the on-device wrapper."""

import re

import pytest
import torch
import torch.nn.functional as F
import torch_xla

from consolidate import consolidate_sharded_model_checkpoints
from support import (FP32, Config, assert_state_close, device_buffer_keys, live_device_tensors,
                     make_batches, make_net, run_fsdp, run_python, run_reference, tensor_bytes, train_steps,
                     wrap_net)
from xla_fsdp import XlaFullyShardedDataParallel as FSDP
from xla_fsdp.optim import BF16AdamW
from xla_fsdp.sharded_checkpoint import save_sharded_checkpoint
from xla_fsdp.testing import run_on_cpu_devices

OFFLOAD = (("cpu_offload", True),)


@pytest.mark.parametrize("world, config", [
    (2, Config(wrap="zero2", optimizer="adamw", fsdp=OFFLOAD)),
    (4, Config(wrap="zero3", optimizer="adamw", checkpoint=True, clip=0.5, micro_batches=2, fsdp=OFFLOAD)),
    (8, Config(wrap="layer", optimizer="sgd", fsdp=OFFLOAD + (("flatten_parameters", False),))),
], ids=["zero2-w2", "zero3-ckpt-clip-nosync-w4", "autowrap-unflat-w8"])
def test_offloaded_training_matches_the_unsharded_reference(world, config):
    result = run_fsdp(world, config)
    reference = run_reference(config)
    torch.testing.assert_close(result.losses, reference.losses, **FP32)
    assert_state_close(result.params, reference.params, **FP32)
    if config.clip is not None:
        torch.testing.assert_close(result.grad_norms, reference.grad_norms, **FP32)


def _live_device_bytes(since: set) -> int:
    return tensor_bytes(live_device_tensors(torch_xla.device(), since=since))


def test_between_steps_only_buffers_stay_on_the_device():
    def bytes_left_on_device(rank, offload):
        already = device_buffer_keys(torch_xla.device())  # what earlier tests left alive is not counted
        model = wrap_net(make_net(), Config(wrap="zero3", fsdp=(("cpu_offload", offload),)))
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        device = torch_xla.device()
        for x, y in make_batches(2):
            opt.zero_grad()
            F.cross_entropy(model(x[:4].to(device)), y[:4].to(device)).backward()
            opt.step()
            torch_xla.sync()
        state = [t for t in [*model.parameters(), *(p.grad for p in model.parameters()),
                             *(v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))]
                 if t is not None and t.dim() > 0]
        buffers = sum(b.numel() * b.element_size() for b in model.buffers())
        return _live_device_bytes(since=already) - buffers, {t.device.type for t in state}

    offloaded = run_on_cpu_devices(bytes_left_on_device, 4, True)
    on_device = run_on_cpu_devices(bytes_left_on_device, 4, False)
    for (left, where), (fsdp_left, fsdp_where) in zip(offloaded, on_device):
        assert where == {"cpu"} and fsdp_where == {"xla"}
        assert fsdp_left > 0 and left == 0, (left, fsdp_left)


def test_bf16_compute_uploads_bf16_shards_and_keeps_fp32_masters():
    def step(rank):
        model = FSDP(make_net(), cpu_offload=True, compute_dtype=torch.bfloat16)
        x, y = make_batches(1)[0]
        out = model(x[:8].to(torch_xla.device()))
        uploaded = {t.dtype for t in model._state._device_shards}  # the root's uploaded shards
        F.cross_entropy(out.float(), y[:8].to(torch_xla.device())).backward()
        return uploaded, {(p.dtype, p.device.type) for p in model.parameters()}, \
            {(p.grad.dtype, p.grad.device.type) for p in model.parameters() if p.grad is not None}

    uploaded, params, grads = run_on_cpu_devices(step, 2)[0]
    assert uploaded == {torch.bfloat16}
    assert params == {(torch.float32, "cpu")} and grads == {(torch.float32, "cpu")}


def test_an_offloaded_checkpoint_consolidates_to_the_full_state_dict(tmp_path):
    config = Config(wrap="zero3", optimizer="adamw", steps=2, fsdp=OFFLOAD)

    def train_and_save(rank):
        model = wrap_net(make_net(), config)
        opt = torch.optim.AdamW(model.parameters(), lr=0.02)
        train_steps(model, opt, make_batches(2), rank, 2)
        save_sharded_checkpoint(tmp_path / "ckpt", model, opt, step=2)
        return model.full_state_dict()

    full = run_on_cpu_devices(train_and_save, 2)[0]
    consolidated, _ = consolidate_sharded_model_checkpoints(str(tmp_path / "ckpt"), progress=False)
    assert_state_close(consolidated, full, rtol=0, atol=0)


def test_an_offloaded_pure_bf16_model_steps_on_the_host_like_the_on_device_one():
    # The benchmark's "offload, pure bf16" mode: bf16 shards on the host, stepped there by BF16AdamW
    # (10 host bytes per parameter instead of 16). Moments rounded to nearest on both sides: stochastic
    # rounding draws from the host RNG in one run and the XLA RNG in the other.
    world = 2

    def train(rank, offload):
        config = Config(wrap="zero3", input_dtype=torch.bfloat16, fsdp=(("cpu_offload", offload),))
        model = wrap_net(make_net().to(torch.bfloat16), config)
        opt = BF16AdamW(model.parameters(), lr=0.02, moment_rounding="nearest")
        train_steps(model, opt, make_batches(3), rank, world, config)
        state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
        return (model.full_state_dict(rank0_only=False), {(p.dtype, p.device.type) for p in model.parameters()},
                {(v.dtype, v.device.type) for v in state})

    host, host_params, host_state = run_on_cpu_devices(train, world, True)[0]
    device, device_params, _ = run_on_cpu_devices(train, world, False)[0]
    initial = make_net().to(torch.bfloat16).state_dict()
    assert host_params == {(torch.bfloat16, "cpu")} and device_params == {(torch.bfloat16, "xla")}
    assert host_state == {(torch.bfloat16, "cpu")}   # moments and Kahan buffers, all bf16 on the host
    assert any(not torch.equal(host[name], initial[name]) for name in initial)   # it trained
    # bf16 tolerances (PyTorch's defaults for bf16): the host's and XLA's fp32 arithmetic inside the step
    # may differ in the last bit (fused multiply-adds), which bf16 rounding can turn into one bf16 ulp.
    assert_state_close(host, device, rtol=1.6e-2, atol=1e-5)


ALIASED_OFFLOAD_RUN = """
import os, sys
from xla_fsdp.testing import configure_cpu_devices
configure_cpu_devices(1)
os.environ["XLA_ENABLE_PARAM_ALIASING"] = "1"   # the TPU default, which the CPU helper turns off
import torch_xla.core.xla_model as xm
import torch_xla.debug.metrics as met
xm.get_xla_supported_devices()                  # start the runtime: the helper then leaves it so
sys.path.insert(0, sys.argv[1])
import torch
from support import FP32, Config, assert_state_close, make_net, run_fsdp, run_reference, wrap_net
config = Config(wrap="zero3", optimizer="adamw", fsdp=(("cpu_offload", True),))
reference = run_reference(config)   # on the device, AdamW updates in place: aliased too, so it runs first
samples = lambda: [value for _, value in (met.metric_data("InputOutputAliasCount") or (0, 0, []))[2]]
before = len(samples())
result = run_fsdp(1, config)
torch.testing.assert_close(result.losses, reference.losses, **FP32)
assert_state_close(result.params, reference.params, **FP32)
shards = sum(1 for p in wrap_net(make_net(), config).parameters() if p.requires_grad)
# One sample per compiled graph: how many outputs it aliases to inputs.
print("aliased", sorted({int(v) for v in samples()[before:] if v}), "of", shards)
"""


def test_with_parameter_aliasing_each_gradient_reuses_its_uploaded_shards_buffer(tmp_path):
    # On a TPU (aliasing on) a step then holds each unit's uploaded shards, not the shards and their
    # gradients: the compiled step aliases every gradient output to its shard's input buffer. The CPU
    # helper turns aliasing off for several devices (shared/PLATFORM.md), so this runs at world size 1.
    out = run_python(ALIASED_OFFLOAD_RUN)
    aliased, shards = re.search(r"aliased (\[[\d, ]*\]) of (\d+)", out).groups()
    assert int(shards) > 0 and aliased == f"[{shards}]", out[-500:]   # the step graph, and only it


def test_two_backward_calls_without_zero_grad_add_up_the_offloaded_gradients():
    # Gradient accumulation the plain PyTorch way: the host .grad must add the second download to the first
    # (a regression that assigned it instead kept only the last backward, silently).
    def grads(rank, offload, backwards):
        model = FSDP(make_net(), cpu_offload=offload)
        for x, y in make_batches(backwards):
            per_rank = x.shape[0] // 2
            out = model(x[rank * per_rank:(rank + 1) * per_rank].to(torch_xla.device()))
            F.cross_entropy(out, y[rank * per_rank:(rank + 1) * per_rank].to(torch_xla.device())).backward()
        torch_xla.sync()
        return {name: p.grad.cpu() for name, p in model.named_parameters() if p.grad is not None}

    offloaded, on_device = run_on_cpu_devices(grads, 2, True, 2), run_on_cpu_devices(grads, 2, False, 2)
    last_only = run_on_cpu_devices(grads, 2, True, 1)
    for got, want, single in zip(offloaded, on_device, last_only):
        assert got.keys() == want.keys() and got
        for name in want:
            torch.testing.assert_close(got[name], want[name], **FP32, msg=lambda m: f"{name}: {m}")
        assert any(not torch.allclose(got[name], single[name]) for name in got)   # two batches, not one
