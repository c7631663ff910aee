"""``checkpoint_module``: the recomputation in backward repeats the forward exactly, side effects once."""


import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_xla
import torch_xla.core.xla_model as xm

from xla_fsdp import checkpoint_module
from xla_fsdp.testing import run_on_cpu_devices

from support import FP32, Config, assert_state_close, count_ops, run_fsdp, run_reference, step_hlo


def _seeded(module: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return module


def _dropout_block() -> nn.Module:
    return _seeded(nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 6)))


def _batchnorm_block() -> nn.Module:
    return _seeded(nn.Sequential(nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh()), nn.Linear(8, 3)))


def _inputs(steps: int):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(5, 6, generator=gen) for _ in range(steps)]


def test_dropout_in_a_checkpointed_block_gets_the_gradients_of_the_loss_it_computed():
    def grads(rank, checkpointed):
        device = torch_xla.device()
        block = _dropout_block().to(device)
        if checkpointed:
            checkpoint_module(block)
        x = _inputs(1)[0].to(device).requires_grad_()
        xm.set_rng_state(1234, str(device))  # the same dropout mask in both runs' forward
        loss = (block(x) ** 2).sum()
        loss.backward()
        torch_xla.sync()
        return loss.item(), x.grad.cpu(), {n: p.grad.cpu() for n, p in block.named_parameters()}

    plain_loss, plain_x, plain = run_on_cpu_devices(grads, 1, False)[0]
    ckpt_loss, ckpt_x, ckpt = run_on_cpu_devices(grads, 1, True)[0]
    assert ckpt_loss == plain_loss  # same mask in the forward
    assert plain["0.weight"].abs().sum() > 0
    torch.testing.assert_close(ckpt_x, plain_x, **FP32)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], msg=lambda m: f"{name}: {m}", **FP32)


def test_random_numbers_after_a_checkpointed_backward_continue_as_without_checkpointing():
    def draws(rank, checkpointed):
        device = torch_xla.device()
        block = _dropout_block().to(device)
        if checkpointed:
            checkpoint_module(block)
        xm.set_rng_state(99, str(device))
        block(_inputs(1)[0].to(device)).sum().backward()
        after = torch.rand(4, device=device)
        torch_xla.sync()
        return after.cpu()

    torch.testing.assert_close(run_on_cpu_devices(draws, 1, True)[0], run_on_cpu_devices(draws, 1, False)[0],
                               rtol=0, atol=0)


def test_batchnorm_running_statistics_are_updated_once_per_step():
    def train(rank, checkpointed):
        device = torch_xla.device()
        block = _batchnorm_block().to(device)
        if checkpointed:
            checkpoint_module(block[0])
        opt = torch.optim.SGD(block.parameters(), lr=0.1)
        for x in _inputs(3):
            opt.zero_grad()
            F.cross_entropy(block(x.to(device)), torch.zeros(5, dtype=torch.long, device=device)).backward()
            opt.step()
            torch_xla.sync()
        return {k: v.cpu() for k, v in block.state_dict().items()}

    plain = run_on_cpu_devices(train, 1, False)[0]
    ckpt = run_on_cpu_devices(train, 1, True)[0]
    assert plain["0.1.num_batches_tracked"].item() == 3
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], msg=lambda m: f"{name}: {m}", **FP32)


def test_zero2_reduce_scatters_each_gradient_once_with_checkpointed_blocks():
    # Each checkpointed block's recomputation runs a backward of its own; if
    # that backward reached the unit's all-gather, the unit would
    # reduce-scatter its whole gradient once per block.
    plain = count_ops(step_hlo(2, Config(wrap="zero2")), "reduce-scatter")
    checkpointed = count_ops(step_hlo(2, Config(wrap="zero2", checkpoint=True)), "reduce-scatter")
    assert checkpointed == plain, (checkpointed, plain)


def test_zero2_with_checkpointed_blocks_matches_the_unsharded_reference():
    config = Config(wrap="zero2", checkpoint=True, optimizer="adamw")
    result = run_fsdp(2, config)
    reference = run_reference(config)
    torch.testing.assert_close(result.losses, reference.losses, **FP32)
    assert_state_close(result.params, reference.params, **FP32)


def test_a_block_checkpointed_under_autocast_recomputes_under_the_same_autocast():
    def grads(rank, checkpointed):
        device = torch_xla.device()
        block = _seeded(nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 6))).to(device)
        if checkpointed:
            checkpoint_module(block)
        with torch.autocast("xla", dtype=torch.bfloat16):
            loss = block(_inputs(1)[0].to(device)).float().pow(2).sum()
        loss.backward()
        torch_xla.sync()
        return {n: p.grad.cpu() for n, p in block.named_parameters()}

    plain = run_on_cpu_devices(grads, 1, False)[0]
    ckpt = run_on_cpu_devices(grads, 1, True)[0]
    for name in plain:  # the same bf16 computation both times
        torch.testing.assert_close(ckpt[name], plain[name], msg=lambda m: f"{name}: {m}", **FP32)
