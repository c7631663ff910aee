"""Shared models, data and training loops for the tests.

Initial weights and data come from seeded ``torch.Generator`` objects: the
global torch RNG is shared by the device threads (see PLATFORM.md), so it
cannot give every rank the same model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_xla
import torch_xla.core.xla_model as xm
import torch_xla.debug.metrics as met
import torch_xla.runtime as xr

from xla_fsdp import XlaFullyShardedDataParallel as FSDP
from xla_fsdp import capture_step, checkpoint_module
from xla_fsdp.optim import BF16AdamW
from xla_fsdp.testing import run_on_cpu_devices
from xla_fsdp.wrap import size_based_auto_wrap_policy, transformer_auto_wrap_policy

# PyTorch's default fp32 tolerances (torch.testing.assert_close).
FP32 = dict(rtol=1.3e-6, atol=1e-5)
GLOBAL_BATCH = 16
D_IN, D_HID, N_CLASSES = 15, 7, 3


class Block(nn.Module):
    """A residual MLP block: the "transformer layer" of the auto-wrap tests."""

    forward_calls = 0  # counts forward runs, to see checkpointing recompute

    def __init__(self, d_in: int = D_IN, d_hid: int = D_HID):
        super().__init__()
        self.norm = nn.LayerNorm(d_in)
        self.fc1 = nn.Linear(d_in, d_hid)      # weight (7, 15) by default: not divisible by 2, 4 or 8
        self.fc2 = nn.Linear(d_hid, d_in)      # weight (15, 7)
        self.gate = nn.Parameter(torch.empty(d_in), requires_grad=False)  # frozen

    def forward(self, x):
        type(self).forward_calls += 1
        return x + self.gate * self.fc2(torch.tanh(self.fc1(self.norm(x))))


class Net(nn.Module):
    """Odd shapes, a tied parameter, a frozen parameter and a buffer."""

    def __init__(self, d_in: int = D_IN, d_hid: int = D_HID):
        super().__init__()
        self.embed = nn.Linear(d_in, d_in)
        self.decode = nn.Linear(d_in, d_in, bias=False)
        self.tie_weights()
        self.blocks = nn.ModuleList([Block(d_in, d_hid), Block(d_in, d_hid)])
        self.head = nn.Parameter(torch.empty(d_in, N_CLASSES))  # (15, 3)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, d_in))

    def tie_weights(self):
        # Moving a module to an XLA device unties its parameters (the CPU and XLA
        # tensor types differ, so nn.Module._apply makes a new Parameter per module).
        self.decode.weight = self.embed.weight

    def forward(self, x):
        h = torch.tanh(self.embed(x)) * self.scale
        for block in self.blocks:
            h = block(h)
        h = h + 0.1 * self.decode(h)
        return h @ self.head


def init_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate"):
                p.copy_(torch.linspace(0.8, 1.2, p.numel()))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.4)
    return model


def make_net(seed: int = 0, d_in: int = D_IN, d_hid: int = D_HID) -> Net:
    return init_weights(Net(d_in, d_hid), seed)


def make_batches(steps: int, seed: int = 1, batch: int = GLOBAL_BATCH, d_in: int = D_IN):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, d_in, generator=gen), torch.randint(0, N_CLASSES, (batch,), generator=gen))
            for _ in range(steps)]


OPTIMIZERS: dict[str, Callable] = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.2, momentum=0.9),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.02),
    # The form capture_step switches AdamW to: the step count and bias corrections on the device.
    "adamw_capturable": lambda params: torch.optim.AdamW(params, lr=0.02, capturable=True),
    "bf16_adamw": lambda params: BF16AdamW(params, lr=0.02),
    # Capturable, and without weight decay (whose learning-rate product a captured step rounds in fp32).
    "bf16_adamw_capturable": lambda params: BF16AdamW(params, lr=0.02, weight_decay=0.0, capturable=True),
}


@dataclass(frozen=True)
class Config:
    """How a test wraps ``Net`` and trains it."""

    wrap: str = "zero3"            # "zero2" (root only), "zero3" (manual nested), "size", "layer", "none"
    checkpoint: bool = False       # checkpoint_module on the blocks
    optimizer: str = "sgd"
    steps: int = 5
    clip: Optional[float] = None   # clip_grad_norm_ max norm
    micro_batches: int = 1         # > 1: no_sync accumulation
    autocast_bf16: bool = False    # run forward under torch.autocast(bfloat16) (the bf16 reference)
    input_dtype: torch.dtype = torch.float32   # torch.bfloat16 for a pure-bf16 model
    fsdp: tuple = ()               # extra constructor options, as (name, value) pairs
    capture: bool = False          # run each step through xla_fsdp.capture_step
    lr_schedule: bool = False      # a LambdaLR that changes the learning rate every step

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)


def wrap_net(net: nn.Module, config: Config, **group_kwargs) -> nn.Module:
    # Flattened unless a test says otherwise: the tests name their unflattened
    # configurations, and torch_xla's default (unflattened) is tested where it is named.
    kwargs = {"flatten_parameters": True, **dict(config.fsdp), **group_kwargs}
    block = checkpoint_module if config.checkpoint else (lambda m: m)
    if config.wrap == "none":
        for b in net.blocks:
            block(b)
        net = net.to(torch_xla.device())
        net.tie_weights()
        return net
    if config.wrap == "zero2":
        for b in net.blocks:
            block(b)
        return FSDP(net, **{"reshard_after_forward": False, **kwargs})
    if config.wrap == "zero3":
        for i, b in enumerate(net.blocks):
            net.blocks[i] = FSDP(block(b), **{"reshard_after_forward": True, **kwargs})
        return FSDP(net, **kwargs)
    policy = (functools.partial(size_based_auto_wrap_policy, min_num_params=250) if config.wrap == "size"
              else functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={Block}))
    wrapper = lambda m, *a, **k: FSDP(block(m), *a, **k)  # noqa: E731
    return FSDP(net, auto_wrap_policy=policy, auto_wrapper_callable=wrapper, **kwargs)


@dataclass
class RunResult:
    losses: list[float]         # per step, mean over the data-parallel group
    params: dict[str, torch.Tensor]
    grad_norms: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def train_steps(model: nn.Module, opt, batches, rank: int, world: int, config: Config = Config(),
                probe: Optional[Callable] = None) -> RunResult:
    """The per-rank training loop: one step on this rank's slice of each global batch.

    ``config`` gives the micro-batches, autocast, clipping, the learning rate
    schedule and whether the step is captured (``capture_step``); ``probe(step,
    model, opt, extra)`` runs after each step's sync. Returns the losses (this
    rank's), gradient norms and ``extra``; ``params`` is left empty.
    """
    device = torch_xla.device()
    losses, norms, extra = [], [], {}
    schedule = (torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.5 * s))
                if config.lr_schedule else None)

    def step(xs, ys):
        opt.zero_grad()
        step_loss = 0.0
        micro = xs.shape[0] // config.micro_batches
        for k in range(config.micro_batches):
            with torch.autocast("xla", dtype=torch.bfloat16, enabled=config.autocast_bf16):
                out = model(xs[k * micro:(k + 1) * micro])
            loss = F.cross_entropy(out.float(), ys[k * micro:(k + 1) * micro]) / config.micro_batches
            if k < config.micro_batches - 1:
                with model.no_sync():
                    loss.backward()
            else:
                loss.backward()
            step_loss = step_loss + loss.detach()
        norm = None
        if config.clip is not None:
            norm = (model.clip_grad_norm_(config.clip) if isinstance(model, FSDP)
                    else torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip))
        opt.step()
        return step_loss, norm

    run_step = capture_step(step) if config.capture else step
    for index, (x, y) in enumerate(batches):
        per_rank = x.shape[0] // world
        xs = x[rank * per_rank:(rank + 1) * per_rank].to(device, config.input_dtype)
        ys = y[rank * per_rank:(rank + 1) * per_rank].to(device)
        step_loss, norm = run_step(xs, ys)
        if not config.capture:
            torch_xla.sync()
        if schedule is not None:
            schedule.step()
        if config.clip is not None:
            norms.append(float(norm.item()))
        losses.append(float(step_loss.item()))
        if probe is not None:
            probe(index, model, opt, extra)
    if config.capture:
        extra["captured_programs"] = run_step.captured
    return RunResult(losses, {}, norms, extra)


def train_rank(rank: int, world: int, config: Config, batches, model_fn=make_net,
               group_kwargs: Optional[dict] = None, probe: Optional[Callable] = None) -> RunResult:
    """Wrap a fresh model as ``config`` says, train it with ``train_steps``; return what the tests compare."""
    group_kwargs = group_kwargs or {}
    model = wrap_net(model_fn(), config, **group_kwargs)
    opt = OPTIMIZERS[config.optimizer]([p for p in model.parameters() if p.requires_grad])
    result = train_steps(model, opt, batches[:config.steps], group_kwargs.get("sharding_rank", rank),
                         group_kwargs.get("sharding_world_size", world), config, probe)
    result.params = (model.full_state_dict(rank0_only=False) if isinstance(model, FSDP)
                     else {k: v.cpu() for k, v in model.state_dict().items()})
    return result


def run_fsdp(world: int, config: Config, batches=None, **kwargs) -> RunResult:
    """Train on ``world`` devices; losses are averaged over ranks (equal local batches)."""
    batches = batches or make_batches(config.steps)
    results = run_on_cpu_devices(lambda rank: train_rank(rank, world, config, batches, **kwargs), world)
    losses = [sum(r.losses[s] for r in results) / world for s in range(config.steps)]
    return RunResult(losses, results[0].params, results[0].grad_norms,
                     {"per_rank": results})


@functools.lru_cache(maxsize=None)
def run_reference(config: Config) -> RunResult:
    """The same model, unsharded, on one XLA device, on the whole global batch."""
    return run_fsdp(1, config.replace(wrap="none", fsdp=(), checkpoint=False, micro_batches=1, capture=False))


def assert_state_close(actual: dict, expected: dict, **tol) -> None:
    assert sorted(actual) == sorted(expected), (sorted(actual), sorted(expected))
    for name in expected:
        torch.testing.assert_close(actual[name].float(), expected[name].float(), msg=lambda m: f"{name}: {m}",
                                   **tol)


def live_device_tensors(device: torch.device, since: Optional[set] = None) -> list[torch.Tensor]:
    """Every tensor on ``device`` alive anywhere in the process, one per device buffer.

    With ``since`` (``device_buffer_keys`` taken earlier), only the buffers that
    were not alive then: what a test made, whatever earlier tests left behind
    (a failed test's traceback keeps its frames, and so its tensors, alive).

    Call it after ``torch_xla.sync()``, when every live tensor is device data.
    torch_xla has no call that lists live buffers (``_xla_tensors_report`` shows
    only tensors with pending IR, ``get_memory_info`` is not implemented for CPU
    devices), so this asks the garbage collector for every ``torch.Tensor``,
    wherever it is referenced from (a module attribute, a hook's closure, an
    optimizer's state, a frame), and adds what the autograd graphs hanging off
    them saved for backward, which C++ holds. Tensors sharing a device buffer
    count once. In ``run_on_cpu_devices`` every rank must call it, the same
    number of times: see ``in_turn``.
    """
    def census() -> list[torch.Tensor]:
        gc.collect()
        # type(), not isinstance(): some lazy module objects warn when asked for __class__.
        found = [t for t in gc.get_objects() if issubclass(type(t), torch.Tensor) and _on(t, device)]
        found += [t for t in _saved_by_autograd(found) if _on(t, device)]
        unique: dict[Any, torch.Tensor] = {}
        for t in found:
            unique.setdefault(_buffer_key(t), t)
        return [t for key, t in unique.items() if since is None or key not in since]

    return in_turn(census)


def in_turn(fn: Callable[[], Any]) -> Any:
    """Call ``fn`` on one rank at a time, while every other rank waits in a rendezvous and the devices are idle.

    For anything that walks ``gc.get_objects()``. That list holds every object
    the collector tracks, including a tensor that another rank's thread is
    deallocating at that moment; touching it resurrects a dying tensor
    ("Deallocating Tensor that still has live PyObject references", then
    "cannot call get_autograd_meta() on undefined tensor", or a segmentation
    fault, which ended a CI run). A rank waiting in the helper's rendezvous
    touches no tensor, and ``xm.wait_device_ops()`` lets no execution replace
    a buffer meanwhile. Outside ``run_on_cpu_devices`` it just calls ``fn``.
    """
    world, rank = xr.world_size(), xr.global_ordinal()
    result = None
    for turn in range(world):
        if world > 1:
            xm.rendezvous(f"in_turn {turn}")
        if turn == rank:
            xm.wait_device_ops()
            result = fn()
    if world > 1:
        xm.rendezvous("in_turn done")
    return result


def device_buffer_keys(device: torch.device) -> set:
    """The device buffers alive now, for ``live_device_tensors(device, since=...)``."""
    return {_buffer_key(t) for t in live_device_tensors(device)}


def _buffer_key(tensor: torch.Tensor) -> Any:
    try:
        return torch_xla._XLAC._get_tensors_handle([tensor])[0]
    except RuntimeError:  # no device data (pending IR): the tensor itself
        return ("tensor", id(tensor))


def _on(tensor: torch.Tensor, device: torch.device) -> bool:
    try:
        return tensor.device == device
    except RuntimeError:  # a tensor without storage (a functionalization wrapper) has no device
        return False


def _saved_by_autograd(tensors) -> list[torch.Tensor]:
    saved, seen = [], set()
    stack = [t.grad_fn for t in tensors if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for attr in ["saved_tensors", *(a for a in dir(node) if a.startswith("_saved_"))]:
            try:
                value = getattr(node, attr)
            except (AttributeError, RuntimeError):  # not a custom Function; or freed by backward
                continue
            values = value if isinstance(value, (tuple, list)) else (value,)
            saved += [v for v in values if isinstance(v, torch.Tensor)]
        stack += [fn for fn, _ in node.next_functions]
    return saved


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def compile_count() -> int:
    return int(met.counter_value("UncachedCompile") or 0)


def step_hlo(world: int, config: Config) -> str:
    """HLO text of one training step's gradients (forward + backward), as rank 0 traces it."""

    def trace(rank: int) -> str:
        device = torch_xla.device()
        model = wrap_net(make_net(), config)
        x, y = make_batches(1)[0]
        per_rank = x.shape[0] // world
        out = model(x[rank * per_rank:(rank + 1) * per_rank].to(device))
        F.cross_entropy(out.float(), y[rank * per_rank:(rank + 1) * per_rank].to(device)).backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        text = torch_xla._XLAC._get_xla_tensors_hlo(grads)
        torch_xla.sync()
        return text

    return run_on_cpu_devices(trace, world)[0]


def count_ops(hlo: str, op: str) -> int:
    """Number of HLO instructions of kind ``op`` (e.g. ``all-gather``)."""
    return sum(1 for line in hlo.splitlines() if f" {op}(" in line and "=" in line)


def run_python(script: str, timeout: int = 600) -> str:
    """Run ``script`` in a fresh interpreter that imports the package and this folder's modules; return stdout.

    For settings that must be chosen before the XLA runtime starts and differ from the test process's
    (parameter aliasing on, one device): the process's own runtime is started already.
    """
    tests = Path(__file__).resolve().parent
    env = {k: v for k, v in os.environ.items() if k not in ("CPU_NUM_DEVICES", "PJRT_DEVICE")}
    env.update(PYTHONPATH=os.pathsep.join([str(tests.parent), str(tests)]))
    done = subprocess.run([sys.executable, "-c", script, str(tests)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


@contextlib.contextmanager
def small_filesystem(directory, megabytes: int = 20):
    """A directory that holds only ``megabytes``: a tmpfs mounted there where the tests run as root.

    Yields ``"tmpfs"``, or ``"rlimit"`` where mounting is not allowed: then the
    caller must run its writer in a subprocess under ``fsize_limit(megabytes)``
    (RLIMIT_FSIZE), which makes a larger write fail with EFBIG as a full disk
    fails with ENOSPC.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(directory)],
                             capture_output=True).returncode == 0
    try:
        yield "tmpfs" if mounted else "rlimit"
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(directory)], check=True)


def fsize_limit(megabytes: int) -> Callable[[], None]:
    """A ``preexec_fn`` giving the child a file-size limit (see ``small_filesystem``)."""
    def limit():
        import resource
        import signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (megabytes << 20, megabytes << 20))
    return limit
