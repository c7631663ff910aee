"""capture_step: N captured steps are N lazy steps, and a replay is never stale.

Each parity test trains the same model twice on the same batches and RNG
seed, once lazily (``fn`` then ``torch_xla.sync()``) and once through
``capture_step`` (the first step lazy, the second captured, the rest
replayed), and compares losses, gradient norms, parameters and optimizer
state. Where both runs execute the same graphs the comparison is bitwise.
``capture_step`` makes AdamW ``capturable=True`` ([Note: learning rates as
graph inputs] in ``xla_fsdp/_capture_state.py``), which orders the same update
differently, so the lazy AdamW runs here are capturable too; they still differ
in the last bit where the captured step multiplies its learning rate (a fp32
tensor) by the weight decay on the device and the lazy step does it in
Python doubles, so AdamW is compared at fp32 tolerances.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_xla
import torch_xla.core.xla_model as xm

from xla_fsdp import CaptureError, capture_step
from xla_fsdp.sharded_checkpoint import load_sharded_checkpoint, save_sharded_checkpoint
from xla_fsdp.testing import run_on_cpu_devices

from support import (FP32, OPTIMIZERS, Block, Config, Net, assert_state_close, init_weights, make_batches,
                     make_net, run_python, train_rank, wrap_net)

SEED = 1234


class DropoutBlock(Block):
    """``Block`` with dropout on its hidden activation: random numbers inside a (checkpointed) unit."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        return x + self.gate * self.fc2(self.drop(torch.tanh(self.fc1(self.norm(x)))))


def make_dropout_net(seed: int = 0) -> Net:
    net = Net()
    net.blocks = nn.ModuleList([DropoutBlock(), DropoutBlock()])
    return init_weights(net, seed)


def optimizer_state(opt) -> dict:
    return {f"{index}.{key}": value.detach().cpu().float() for index, state in opt.state_dict()["state"].items()
            for key, value in state.items() if isinstance(value, torch.Tensor)}


def run(world: int, config: Config, model_fn=make_net) -> list:
    """Train on ``world`` devices from one RNG seed; per rank: losses, norms, full parameters, optimizer state."""
    batches = make_batches(config.steps)

    def rank_fn(rank: int):
        xm.set_rng_state(SEED, str(torch_xla.device()))

        def keep_optimizer_state(step, model, opt, extra):
            if step == config.steps - 1:
                extra["optimizer"] = optimizer_state(opt)
                extra["grads"] = {name: p.grad.cpu() for name, p in model.named_parameters() if p.grad is not None}

        return train_rank(rank, world, config, batches, model_fn=model_fn, probe=keep_optimizer_state)

    return run_on_cpu_devices(rank_fn, world)


def assert_same_training(lazy: list, captured: list, bitwise: bool) -> None:
    for rank, (a, b) in enumerate(zip(lazy, captured)):
        if bitwise:
            assert a.losses == b.losses, f"rank {rank}"
            assert a.grad_norms == b.grad_norms, f"rank {rank}"
            for name in a.params:
                assert torch.equal(a.params[name], b.params[name]), f"rank {rank} parameter {name}"
            for kind in ("optimizer", "grads"):
                assert sorted(a.extra[kind]) == sorted(b.extra[kind]) and a.extra[kind]
                for name in a.extra[kind]:
                    assert torch.equal(a.extra[kind][name], b.extra[kind][name]), f"rank {rank} {kind} {name}"
        else:
            torch.testing.assert_close(b.losses, a.losses, **FP32)
            torch.testing.assert_close(b.grad_norms, a.grad_norms, **FP32)
            assert_state_close(b.params, a.params, **FP32)
            assert_state_close(b.extra["optimizer"], a.extra["optimizer"], **FP32)
            assert_state_close(b.extra["grads"], a.extra["grads"], **FP32)
        assert b.extra["captured_programs"] == 1, f"rank {rank}: {b.extra['captured_programs']} programs"


PARITY = {
    "world1-zero3-sgd-schedule": (1, Config(wrap="zero3", optimizer="sgd", lr_schedule=True, steps=6), make_net, True),
    "world2-zero2-adamw-schedule-clip": (2, Config(wrap="zero2", optimizer="adamw_capturable", lr_schedule=True,
                                                   clip=0.5,
                                                   steps=6), make_net, False),
    "world4-layer-checkpoint-dropout-no_sync-clip": (4, Config(wrap="layer", checkpoint=True, optimizer="sgd",
                                                              clip=0.5, micro_batches=2, steps=6),
                                                     make_dropout_net, True),
    "world8-zero3-unflattened-adamw": (8, Config(wrap="zero3", optimizer="adamw_capturable", steps=5,
                                                 fsdp=(("flatten_parameters", False),)), make_net, False),
}


@pytest.mark.parametrize("case", sorted(PARITY))
def test_captured_steps_equal_lazy_steps(case):
    world, config, model_fn, bitwise = PARITY[case]
    lazy = run(world, config, model_fn)
    captured = run(world, config.replace(capture=True), model_fn)
    assert_same_training(lazy, captured, bitwise)


def test_a_learning_rate_schedule_reaches_every_replay():
    # The same run without the schedule differs from step 3 on: a replay that kept the captured
    # learning rate would match it instead.
    config = Config(wrap="zero3", optimizer="sgd", steps=5, capture=True)
    scheduled = run(2, config.replace(lr_schedule=True))[0].losses
    constant = run(2, config)[0].losses
    lazy = run(2, config.replace(lr_schedule=True, capture=False))[0].losses
    assert scheduled == lazy
    assert scheduled[:2] == constant[:2] and scheduled[3:] != constant[3:]


def test_pure_bf16_with_bf16adamw_trains_like_lazy_steps():
    # bf16 parameters, BF16AdamW (Kahan compensation, stochastically rounded moments: device random
    # numbers drawn in the optimizer step), capturable in both runs and without weight decay, so the
    # graphs are the same and the random streams must be too.
    config = Config(wrap="zero3", optimizer="bf16_adamw_capturable", input_dtype=torch.bfloat16, steps=5)
    bf16 = lambda: make_net().to(torch.bfloat16)  # noqa: E731
    assert_same_training(run(2, config, bf16), run(2, config.replace(capture=True), bf16), bitwise=True)


# ------------------------------------------------------------- what changes between steps
def loop(world: int, steps: int, between=None, model_fn=make_net, optimizer: str = "sgd", batch_sizes=None,
         captured: bool = True, step_args=lambda step: (), order=None):
    """Train ZeRO-3 ``Net`` on ``world`` devices; ``between(step, model, opt, run_step)`` runs before each step.

    Step ``i`` trains on batch ``order[i]`` (default ``i``). Returns, per rank, the losses, the full
    parameters and how many captures the step made.
    """
    order = order or list(range(steps))
    all_batches = make_batches(max(order) + 1)
    batches = [all_batches[i] for i in order]

    def rank_fn(rank: int):
        device = torch_xla.device()
        xm.set_rng_state(SEED, str(device))
        model = wrap_net(model_fn(), Config(wrap="zero3"))
        opt = OPTIMIZERS[optimizer]([p for p in model.parameters() if p.requires_grad])

        def train_step(x, y, *extra):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            if extra:
                loss = loss * extra[0]
            loss.backward()
            opt.step()
            return loss.detach()

        run_step = capture_step(train_step) if captured else train_step
        losses = []
        for step, (x, y) in enumerate(batches):
            if between is not None:
                between(step, model, opt, run_step)
            n = (batch_sizes[step] if batch_sizes else x.shape[0]) // world
            loss = run_step(x[rank * n:(rank + 1) * n].to(device), y[rank * n:(rank + 1) * n].to(device),
                            *step_args(step))
            if not captured:
                torch_xla.sync()
            losses.append(loss.item())
        return losses, model.full_state_dict(rank0_only=False), run_step.captures if captured else 0

    return run_on_cpu_devices(rank_fn, world)


def assert_loops_equal(lazy, captured, bitwise: bool = True) -> None:
    for (lazy_losses, lazy_params, _), (losses, params, _) in zip(lazy, captured):
        if bitwise:
            assert losses == lazy_losses
            for name in lazy_params:
                assert torch.equal(params[name], lazy_params[name]), name
        else:
            torch.testing.assert_close(losses, lazy_losses, **FP32)
            assert_state_close(params, lazy_params, **FP32)


CHANGES = {
    # name: (loop arguments, captures expected)
    "batch size": (dict(batch_sizes=[16, 16, 16, 8, 8, 16]), 2),
    "train to eval": (dict(model_fn=make_dropout_net,
                           between=lambda step, model, opt, run: model.train(step < 3)), 2),
    "requires_grad": (dict(between=lambda step, model, opt, run: step == 3 and
                           model.flat_param_0.requires_grad_(False)), 2),
    "momentum": (dict(between=lambda step, model, opt, run: step == 3 and
                      opt.param_groups[0].__setitem__("momentum", 0.5)), 2),
    "python argument": (dict(step_args=lambda step: (1.0 if step < 3 else 0.5,)), 2),
    # Changed in place outside the step (as a model load_state_dict does): the same program, new values.
    # Compared at fp32 tolerances: the lazy step fuses the scaling into its graph, the captured step has it
    # computed first, in a graph of its own (a last-bit difference in the loss after 3 more steps).
    "parameters scaled in place": (dict(between=lambda step, model, opt, run: step == 3 and
                                        _scale_parameters(model, 0.5)), 1, False),
}


def _scale_parameters(model, factor: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(factor)


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_change_between_steps_is_captured_again_not_replayed_stale(change):
    arguments, captures, *bitwise = CHANGES[change]
    lazy = loop(2, 6, captured=False, **arguments)
    captured = loop(2, 6, **arguments)
    assert_loops_equal(lazy, captured, *bitwise)
    assert [c for _, _, c in captured] == [captures] * 2


def test_a_checkpoint_saved_and_loaded_between_replays_resumes_the_captured_loop(tmp_path):
    directory = str(tmp_path / "run")

    def save_then_roll_back(step, model, opt, run):
        if step == 3:
            save_sharded_checkpoint(directory, model, opt, step=3)
        if step == 5:  # back to step 3, into the same captured step
            load_sharded_checkpoint(directory, model, opt)

    # Batches 0 1 2 3 4, then 3 4 again from the checkpoint saved before step 3.
    rolled_back = loop(2, 7, between=save_then_roll_back, order=[0, 1, 2, 3, 4, 3, 4])
    for losses, _, captures in rolled_back:
        assert losses[5:] == losses[3:5]
        assert captures == 2  # load_state_dict replaced the optimizer's state: captured again

    def resume(step, model, opt, run):
        if step == 0:
            load_sharded_checkpoint(directory, model, opt)

    resumed = loop(2, 2, between=resume, order=[3, 4])  # as a new process would, into a new captured loop
    for (losses, params, _), (again, again_params, _) in zip(rolled_back, resumed):
        assert again == losses[3:5]
        for name in params:
            assert torch.equal(again_params[name], params[name]), name


def test_a_hyperparameter_that_changes_every_step_is_captured_every_time_with_a_warning():
    # momentum is a constant of the graph (only learning rates are inputs): correct, but no faster.
    set_momentum = lambda step, model, opt, run: opt.param_groups[0].__setitem__("momentum", 0.9 - 0.05 * step)  # noqa
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        captured = loop(1, 8, between=set_momentum)
    assert_loops_equal(loop(1, 8, between=set_momentum, captured=False), captured)
    assert captured[0][2] == 7
    assert any("captured 4 times already" in str(w.message) and "'momentum'" in str(w.message) for w in caught)


def test_module_calls_outside_a_captured_trace_keep_torch_s_fast_path():
    """Importing xla_fsdp or replaying installs no global module hook (each one slows every module call)."""
    from torch.nn.modules import module as module_module

    def global_module_hooks() -> int:
        return len(module_module._global_forward_pre_hooks) + len(module_module._global_forward_hooks)

    before = global_module_hooks()

    def rank_fn(rank: int):
        model = wrap_net(make_net(), Config(wrap="zero3"))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        during = []

        def body(x, y):
            during.append(global_module_hooks())
            return plain_step(model, opt, x, y)

        step = capture_step(body)
        x, y = (t.to(torch_xla.device()) for t in make_batches(1)[0])
        after = []
        for _ in range(3):
            step(x, y)
            after.append(global_module_hooks())
        assert step.captured
        return during, after

    during, after = run_on_cpu_devices(rank_fn, 1)[0]
    assert during == [before + 2, before + 2]  # the discovery call and the capture trace
    assert after == [before] * 3


# ------------------------------------------------------------------------- what is refused
def refusal(step_body, model_fn=make_net, config: Config = Config(wrap="zero3"), calls: int = 2) -> str:
    """The CaptureError that capturing ``step_body(model, opt, x, y)`` raises on one device."""
    def rank_fn(rank: int):
        model = wrap_net(model_fn(), config)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        step = capture_step(lambda x, y: step_body(model, opt, x, y))
        x, y = make_batches(1)[0]
        with pytest.raises(CaptureError) as caught:
            for _ in range(calls):
                step(x.to(torch_xla.device()), y.to(torch_xla.device()))
        return str(caught.value)

    return run_on_cpu_devices(rank_fn, 1)[0]


def plain_step(model, opt, x, y):
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss


def test_a_host_read_in_the_step_is_refused_with_where_to_move_it():
    def reads(model, opt, x, y):
        loss = plain_step(model, opt, x, y)
        print(f"loss {loss.item():.3f}")
        return loss

    message = refusal(reads)
    assert "item" in message and "Return the tensor" in message and "loss.item()" in message


def test_printing_a_tensor_in_the_step_is_refused():
    assert "__repr__" in refusal(lambda model, opt, x, y: print(plain_step(model, opt, x, y)))


def test_a_sync_or_a_step_closure_in_the_step_is_refused():
    def syncs(model, opt, x, y):
        loss = plain_step(model, opt, x, y)
        torch_xla.sync()
        return loss

    def adds_closure(model, opt, x, y):
        loss = plain_step(model, opt, x, y)
        xm.add_step_closure(lambda: None)
        return loss

    assert "torch_xla.sync()" in refusal(syncs)
    assert "step closure" in refusal(adds_closure)


class KeepsLogits(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = make_net()
        self.blocks = self.net.blocks

    def forward(self, x):
        self.last_logits = self.net(x)
        return self.last_logits


def test_a_computed_tensor_kept_outside_the_state_is_refused():
    message = refusal(plain_step, model_fn=KeepsLogits, config=Config(wrap="zero2"))
    assert "1 computed tensor" in message and "stale" in message and "shape=f32[16,3]" in message


def test_a_device_tensor_read_from_outside_its_state_is_refused():
    def rank_fn(rank: int):
        device = torch_xla.device()
        scale = torch.full((3,), 2.0).to(device)   # neither an argument nor module or optimizer state
        model = wrap_net(make_net(), Config(wrap="zero3"))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)

        def step_fn(x, y):
            opt.zero_grad()
            loss = F.cross_entropy(model(x) * scale, y)
            loss.backward()
            opt.step()
            return loss

        step = capture_step(step_fn)
        x, y = make_batches(1)[0]
        with pytest.raises(CaptureError) as caught:
            for _ in range(2):
                step(x.to(device), y.to(device))
        return str(caught.value)

    message = run_on_cpu_devices(rank_fn, 1)[0]
    assert "shape (3,)" in message and "Pass it as an argument" in message


def test_cpu_offload_and_sync_on_finalization_are_refused_with_the_reason():
    offload = refusal(plain_step, config=Config(wrap="zero3", fsdp=(("cpu_offload", True),)))
    assert "cpu_offload=True" in offload and "host" in offload
    finalize = refusal(plain_step, config=Config(wrap="zero3", fsdp=(("sync_on_finalization", True),)))
    assert "sync_on_finalization=True" in finalize


def test_unsupported_arguments_and_results_are_refused():
    def rank_fn(rank: int):
        device = torch_xla.device()
        model = wrap_net(make_net(), Config(wrap="zero3"))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = make_batches(1)[0]
        x, y = x.to(device), y.to(device)
        messages = []
        scaled = capture_step(lambda x, y, scale: plain_step(model, opt, x, y) * scale)
        with pytest.raises(CaptureError) as caught:
            for _ in range(2):
                scaled(x, y, torch.tensor(0.5).to(device))
        messages.append(str(caught.value))
        counted = capture_step(lambda x, y: (plain_step(model, opt, x, y), 3))
        with pytest.raises(CaptureError) as caught:
            for _ in range(2):
                counted(x, y)
        messages.append(str(caught.value))
        with pytest.raises(CaptureError) as caught:
            capture_step(lambda x, y, opts: plain_step(model, opt, x, y))(x, y, {"a": [1, object()]})
        messages.append(str(caught.value))
        return messages

    zero_dim, number, unhashable = run_on_cpu_devices(rank_fn, 1)[0]
    assert "0-dimensional" in zero_dim and "shape (1,)" in zero_dim
    assert "returns a int" in number
    assert "an argument of type object" in unhashable


ALIASED_CAPTURE_RUN = """
import os, sys
from xla_fsdp.testing import configure_cpu_devices
configure_cpu_devices(1)
os.environ["XLA_ENABLE_PARAM_ALIASING"] = "1"   # the TPU default, which the CPU helper turns off
import torch_xla.core.xla_model as xm
import torch_xla.debug.metrics as met
xm.get_xla_supported_devices()                  # start the runtime: the helper then leaves it so
sys.path.insert(0, sys.argv[1])
import torch
from support import Config, make_net, run_fsdp, wrap_net
config = Config(wrap="zero3", optimizer="sgd", steps=5, lr_schedule=True)
lazy = run_fsdp(1, config)
samples = lambda: [int(v) for _, v in (met.metric_data("InputOutputAliasCount") or (0, 0, []))[2]]
before = len(samples())
captured = run_fsdp(1, config.replace(capture=True))
assert captured.losses == lazy.losses, (captured.losses, lazy.losses)
for name in lazy.params:
    assert torch.equal(captured.params[name], lazy.params[name]), name
trainable = sum(1 for p in wrap_net(make_net(), config).parameters() if p.requires_grad)
# The captured graph donates each trainable shard and its momentum buffer, which it updates in place.
print("aliased", sorted(set(samples()[before:])), "expected", 2 * trainable)
"""


def test_with_parameter_aliasing_a_replay_writes_the_state_into_its_own_buffers():
    # On a TPU (aliasing on) the state a captured step updates in place is donated to the graph; the CPU
    # helper turns aliasing off for several devices (shared/PLATFORM.md), so this runs at world size 1.
    out = run_python(ALIASED_CAPTURE_RUN)
    aliased, expected = re.search(r"aliased \[([\d, ]*)\] expected (\d+)", out).groups()
    assert int(expected) > 0 and int(expected) in [int(a) for a in aliased.split(",") if a.strip()], out


def test_batches_from_mp_device_loader_replay_like_lazy_steps():
    # MpDeviceLoader uploads each batch ahead of its step and marks a step at every batch (after a replay, a
    # sync with nothing to run): captured steps on its batches must be the lazy steps, bit for bit.
    from torch_xla.distributed.parallel_loader import MpDeviceLoader

    def rank_fn(rank: int, captured: bool):
        device = torch_xla.device()
        model = wrap_net(make_net(), Config(wrap="zero3"))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

        def train_step(x, y):
            return plain_step(model, opt, x, y).detach()

        step = capture_step(train_step) if captured else train_step
        batches = [(x[rank * 8:(rank + 1) * 8], y[rank * 8:(rank + 1) * 8]) for x, y in make_batches(5)]
        losses = [step(x, y) for x, y in MpDeviceLoader(batches, device)]
        return [loss.item() for loss in losses], model.full_state_dict(rank0_only=False)

    lazy = run_on_cpu_devices(lambda rank: rank_fn(rank, False), 2)
    captured = run_on_cpu_devices(lambda rank: rank_fn(rank, True), 2)
    for (lazy_losses, lazy_params), (losses, params) in zip(lazy, captured):
        assert len(losses) == 5 and losses == lazy_losses
        for name in lazy_params:
            assert torch.equal(params[name], lazy_params[name]), name
