"""One configuration of the memory benchmark on N CPU XLA devices.

Run by ``benchmarks.memory_bench`` as ``python -m benchmarks._memory_side CONFIG.json OUT.json``, one process
per configuration in the full benchmark (so that the live tensors counted on a device are that configuration's
alone; ``--quick`` too, and it subtracts what was live before a mode started), with
``CPU_NUM_DEVICES=N`` and ``XLA_FLAGS=--xla_dump_to=DIR`` (for the buffer assignments and the HLO).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from tests.support import device_buffer_keys, live_device_tensors
from xla_fsdp.crosscheck.models import Size, build
from xla_fsdp.optim import BF16AdamW
from xla_fsdp.testing import configure_cpu_devices, run_on_cpu_devices

from ._hlo import buffer_assignment_peak, collective_bytes, collective_dtypes


@dataclass(frozen=True)
class Mode:
    """One way to train the benchmark's model; ``name`` is what the report prints."""

    name: str
    library: str                     # "xla_fsdp" or "torch_xla"
    compute_bf16: bool = False       # compute_dtype=torch.bfloat16 (fp32 masters unless pure_bf16)
    pure_bf16: bool = False          # parameters, gradients and optimizer state stored in bf16
    cpu_offload: bool = False


MODES = (
    Mode("torch_xla FSDP (fp32)", "torch_xla"),
    Mode("fp32", "xla_fsdp"),
    Mode("bf16 compute", "xla_fsdp", compute_bf16=True),
    Mode("pure bf16", "xla_fsdp", compute_bf16=True, pure_bf16=True),
    Mode("offload, fp32 compute", "xla_fsdp", cpu_offload=True),
    Mode("offload, bf16 compute", "xla_fsdp", compute_bf16=True, cpu_offload=True),
    # bf16 shards on the host, stepped there by BF16AdamW: 10 host bytes per parameter instead of 16.
    Mode("offload, pure bf16", "xla_fsdp", compute_bf16=True, pure_bf16=True, cpu_offload=True),
)
BASELINE = "fp32"          # step times are ratios to this mode's
TORCH_XLA = MODES[0].name


def _wrap(mode: Mode, model):
    if mode.library == "torch_xla":
        from torch_xla.distributed.fsdp import XlaFullyShardedDataParallel as FSDP
        options = {"pin_layout_in_collective_ops": False}   # the CPU setting of PLATFORM.md
    else:
        from xla_fsdp import XlaFullyShardedDataParallel as FSDP
        # The model traces the same graph on every rank ([Note: the collective token]).
        options = {"untokened_reduce_scatter": True, "cpu_offload": mode.cpu_offload}
        if mode.compute_bf16:
            options["compute_dtype"] = torch.bfloat16
    if mode.pure_bf16:
        model = model.to(torch.bfloat16)
    for i, layer in enumerate(model.layers):   # ZeRO-3: a unit per block, resharded after forward
        model.layers[i] = FSDP(layer, reshard_after_forward=True, **options)
    return FSDP(model, **options)


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _buffer_bytes(tensors) -> int:
    """Bytes of the device buffers behind ``tensors`` (one per buffer, ``tests.support.live_device_tensors``),
    at their real shape: torch_xla's FSDP frees a full parameter by pointing it at a 1-element placeholder,
    after which the tensor's ``numel()`` still reports the full size while its ``shape`` gives the buffer's."""
    return sum(math.prod(t.shape) * t.element_size() for t in tensors)


def _state_tensors(model, opt) -> list[torch.Tensor]:
    """The training state the step keeps: parameters (shards), their gradients, the optimizer's tensors."""
    params = list(model.parameters())
    return params + [p.grad for p in params if p.grad is not None] + \
        [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim() > 0]


PER_RANK = ("live_device_bytes", "live_before_bytes", "state_device_bytes", "host_bytes", "transfer_bytes")


def _dumped() -> set[str]:
    directory = os.environ.get("XLA_FSDP_BENCH_DUMP")
    return {p.name for p in Path(directory).glob("*buffer-assignment.txt")} if directory else set()


def run_mode(rank: int, world: int, mode: Mode, size: Size, cfg: dict) -> dict:
    import torch_xla
    import torch_xla.core.xla_model as xm

    device = torch_xla.device()
    # Empty in a fresh process; else what earlier modes left behind, which this mode's figures leave out.
    live_before = _buffer_bytes(live_device_tensors(device))
    alive_before = device_buffer_keys(device)
    model = _wrap(mode, build("vit", size=size))
    lr = 1e-4
    if mode.pure_bf16:   # bf16 moments and a bf16 Kahan compensation buffer
        opt, opt_name = BF16AdamW(model.parameters(), lr=lr, compensation="kahan"), "BF16AdamW (Kahan)"
    else:   # on the host for offload (its shards are host tensors), on the device otherwise
        opt, opt_name = torch.optim.AdamW(model.parameters(), lr=lr, foreach=True), "torch.optim.AdamW (foreach)"
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(cfg["batch_per_device"], *size.image, generator=gen)
    x = x.to(device, torch.bfloat16 if mode.pure_bf16 else torch.float32)
    y = torch.randint(0, 10, (cfg["batch_per_device"],), generator=gen).to(device)
    times, modules = [], []
    for _ in range(cfg["warmup"] + cfg["steps"]):
        before = _dumped() if rank == 0 else set()
        start = time.perf_counter()
        opt.zero_grad()
        loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        torch_xla.sync()
        xm.wait_device_ops(xm.xla_real_devices([str(device)]))
        times.append(time.perf_counter() - start)
        modules.append(sorted(_dumped() - before) if rank == 0 else [])
        del loss

    del x, y
    torch_xla.sync()
    live = _buffer_bytes(live_device_tensors(device, since=alive_before))  # earlier ones may go meanwhile
    state = _state_tensors(model, opt)
    on_device = _tensor_bytes(t for t in state if t.device.type == "xla")
    on_host = _tensor_bytes(t for t in state if t.device.type == "cpu")
    shards = list(model.parameters())
    transfer = 0
    if mode.cpu_offload:
        # Each forward uploads every shard in compute_dtype; backward downloads its gradient in the same dtype.
        compute = torch.bfloat16 if mode.compute_bf16 else None
        transfer = 2 * sum(p.numel() * (compute or p.dtype).itemsize for p in shards)
    result = {"rank": rank, "live_device_bytes": live, "live_before_bytes": live_before,
              "state_device_bytes": on_device, "host_bytes": on_host,
              "transfer_bytes": transfer, "param_dtypes": sorted({str(p.dtype) for p in shards}),
              "param_devices": sorted({p.device.type for p in shards}), "optimizer": opt_name}
    del model, opt, state, shards
    if rank != 0:
        return result
    # The step's graphs: those first compiled in the last of the first two steps that compiled any
    # (the second step adds the optimizer state's update to the first one's graph).
    step_modules = next((mods for mods in reversed(modules[:2]) if mods), [])
    dump = Path(os.environ["XLA_FSDP_BENCH_DUMP"]) if step_modules else None
    peaks = [buffer_assignment_peak(dump / m) for m in step_modules]
    collectives: Optional[dict] = None
    if step_modules:
        collectives = {"all-gather": 0, "reduce-scatter": 0, "all-reduce": 0}
        dtypes = set()
        for m in step_modules:
            hlo = (dump / m.replace("-buffer-assignment.txt", ".txt")).read_text()
            for kind, n in collective_bytes(hlo, world).items():
                collectives[kind] += n
            dtypes |= collective_dtypes(hlo)
        collectives["dtypes"] = sorted(dtypes)
    steady = times[cfg["warmup"]:]
    return {**result, "step_s_median": statistics.median(steady), "step_s": steady,
            "compiled_peak_bytes": max((p for p in peaks if p is not None), default=None),
            "step_modules": len(step_modules), "collective_bytes_per_rank": collectives}


def main(config_path: str, out_path: str) -> None:
    """Run ``cfg["modes"]`` one after another (the full benchmark passes one mode per process)."""
    cfg = json.loads(Path(config_path).read_text())
    world = cfg["world_size"]
    configure_cpu_devices(world)
    size = Size(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg["size"].items()})
    params = sum(p.numel() for p in build("vit", size=size).parameters())
    out = []
    for name in cfg["modes"]:
        mode = next(m for m in MODES if m.name == name)
        ranks = run_on_cpu_devices(run_mode, world, world, mode, size, cfg)
        out.append({"mode": asdict(mode), "world_size": world, "params": params,
                    **{k: v for k, v in ranks[0].items() if k != "rank"},
                    "per_rank": [{k: r[k] for k in PER_RANK} for r in ranks]})
    Path(out_path).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
