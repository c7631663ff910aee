"""Ranks that disagree get an error that names where, on every rank, within seconds: never a hang or an abort.

Before the collective check each of these programs ended the whole process in
SIGABRT after XLA's 10 s rendezvous timeout ("Termination timeout for `all
gather RendezvousKey{...}` of 10 seconds exceeded"); see [Note: the collective
check] in ``xla_fsdp/_collective_check.py``.
"""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torch_xla

from support import Config, Net, make_batches, make_net, init_weights, wrap_net
from xla_fsdp import _collective_check
from xla_fsdp._collective_check import CollectiveCheckTimeout, CollectiveMismatchError
from xla_fsdp.sharded_checkpoint import load_sharded_checkpoint, save_sharded_checkpoint
from xla_fsdp.testing import run_on_cpu_devices

WORLDS = pytest.mark.parametrize("world", [2, 4])


class SkippingNet(Net):
    """``Net`` whose second block can be skipped: a data-dependent branch taken on one rank."""

    skip_second_block = False

    def forward(self, x):
        h = torch.tanh(self.embed(x)) * self.scale
        for index, block in enumerate(self.blocks):
            if not (index == 1 and self.skip_second_block):
                h = block(h)
        h = h + 0.1 * self.decode(h)
        return h @ self.head


def _train_step(model, opt, rank, world, batch):
    x, y = batch
    per_rank = x.shape[0] // world
    device = torch_xla.device()
    opt.zero_grad()
    out = model(x[rank * per_rank:(rank + 1) * per_rank].to(device))
    F.cross_entropy(out, y[rank * per_rank:(rank + 1) * per_rank].to(device)).backward()


def _errors_of_every_rank(fn, world):
    """Run ``fn(rank)``; return (what each rank raised, as text; seconds the run took)."""
    errors = {}

    def recorded(rank):
        try:
            return fn(rank)
        except BaseException as exc:
            errors[rank] = f"{type(exc).__name__}: {exc}"
            raise

    start = time.monotonic()
    with pytest.raises(BaseException):
        run_on_cpu_devices(recorded, world)
    return [errors.get(rank) for rank in range(world)], time.monotonic() - start


def _assert_one_mismatch_error_on_every_rank(errors, seconds):
    assert all(e is not None and e.startswith(CollectiveMismatchError.__name__) for e in errors), errors
    assert len(set(errors)) == 1, errors          # the same message everywhere
    assert seconds < 10, seconds                  # before XLA's rendezvous would have given up


@WORLDS
def test_a_unit_skipped_on_one_rank_names_the_unit_on_every_rank(world):
    def fn(rank):
        model = wrap_net(init_weights(SkippingNet()), Config(wrap="zero3"))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step, batch in enumerate(make_batches(2)):
            model.module.skip_second_block = rank == 1 and step == 1
            _train_step(model, opt, rank, world, batch)
            opt.step()
            torch_xla.sync()

    errors, seconds = _errors_of_every_rank(fn, world)
    _assert_one_mismatch_error_on_every_rank(errors, seconds)
    message = errors[0]
    assert "rank 1: all-gather of FSDP unit 'blocks.0' (backward all-gather" in message, message
    assert "all-gather of FSDP unit 'blocks.1' (forward all-gather" in message, message
    assert "run FSDP units 'blocks.1' and 'blocks.0' on every rank" in message, message
    assert "an input that contributes nothing" in message, message
    assert f"{__file__}:" in message, message     # where the ranks reached the step marker


@WORLDS
def test_clip_grad_norm_on_one_rank_only_is_an_error_naming_it(world):
    def fn(rank):
        model = wrap_net(make_net(), Config(wrap="zero3"))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        _train_step(model, opt, rank, world, make_batches(1)[0])
        if rank == 0:
            model.clip_grad_norm_(1.0)
        opt.step()
        torch_xla.sync()

    errors, seconds = _errors_of_every_rank(fn, world)
    _assert_one_mismatch_error_on_every_rank(errors, seconds)
    others = "rank 1" if world == 2 else "ranks 1, 2, 3"
    assert "rank 0: all-gather of clip_grad_norm_" in errors[0], errors[0]
    assert f"{others}: nothing (it issued" in errors[0], errors[0]
    assert "call clip_grad_norm_ on every rank, or on none" in errors[0], errors[0]


@WORLDS
@pytest.mark.parametrize("call", ["save", "load"])
def test_a_sharded_save_or_load_on_one_rank_only_is_an_error_naming_it(tmp_path, world, call):
    def fn(rank):
        model = wrap_net(make_net(), Config(wrap="zero3"))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        save_sharded_checkpoint(tmp_path / "c", model, step=0)   # on every rank: fine
        for step, batch in enumerate(make_batches(2)):
            _train_step(model, opt, rank, world, batch)
            opt.step()
            torch_xla.sync()
            if rank == 0 and step == 0:
                if call == "save":
                    save_sharded_checkpoint(tmp_path / "c", model, step=1)
                else:
                    load_sharded_checkpoint(tmp_path / "c", model)

    errors, seconds = _errors_of_every_rank(fn, world)
    _assert_one_mismatch_error_on_every_rank(errors, seconds)
    message = errors[0]
    public = "save_sharded_checkpoint" if call == "save" else "load_sharded_checkpoint"
    assert f"rank 0: {__file__}:" in message and f"inside xla_fsdp's {public}()" in message, message
    assert f"{public} makes a step marker and is collective: call it on every rank" in message, message
    if call == "load":   # its barrier meets the others' next step; a save first syncs with nothing issued
        assert "rank 0: all-gather of load_sharded_checkpoint (sharded-checkpoint barrier" in message, message
    else:
        assert "rank 0: nothing (it issued 0 collectives" in message, message


@WORLDS
def test_an_exception_on_one_rank_mid_step_stops_the_others_with_an_error_naming_it(world):
    def fn(rank):
        model = wrap_net(make_net(), Config(wrap="zero3"))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        _train_step(model, opt, rank, world, make_batches(1)[0])
        if rank == 1:
            time.sleep(1)   # the others reach the step marker first (before the fix, rank 0 had launched then)
            raise KeyError("a bad batch")
        opt.step()
        torch_xla.sync()

    errors, seconds = _errors_of_every_rank(fn, world)
    assert errors[1] == "KeyError: 'a bad batch'", errors
    for rank in set(range(world)) - {1}:
        assert f"rank 1 of {world} failed (KeyError: 'a bad batch'); this rank stopped in torch_xla.sync() #" \
            in errors[rank], errors
    assert seconds < 10, seconds


def test_ranks_that_agree_train_as_before_and_leave_no_log_behind():
    def fn(rank):
        model = wrap_net(make_net(), Config(wrap="zero3"))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        _train_step(model, opt, rank, 2, make_batches(1)[0])
        model.clip_grad_norm_(1.0)
        opt.step()
        issued = _collective_check.pending()   # what the check will compare at the step marker
        torch_xla.sync()
        return [c.issuer for c in issued], _collective_check.pending()

    for issuers, left in run_on_cpu_devices(fn, 2):
        assert issuers[0] == "FSDP unit '(root)'" and "FSDP unit 'blocks.1'" in issuers, issuers
        assert issuers[-1] == "clip_grad_norm_" and left == (), (issuers, left)


def test_check_collectives_false_on_the_root_turns_the_check_off():
    def fn(rank, check):
        model = wrap_net(make_net(), Config(wrap="zero3", fsdp=(("check_collectives", check),)))
        _train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), rank, 2, make_batches(1)[0])
        issued = len(_collective_check.pending())
        torch_xla.sync()
        return issued

    assert run_on_cpu_devices(fn, 2, False) == [0, 0]
    assert min(run_on_cpu_devices(fn, 2, True)) > 0


# ------------------------------------------------- between processes (a TPU's one process per chip)
DYING_RANK = textwrap.dedent("""
    import datetime, sys, torch.distributed as dist
    from xla_fsdp import _collective_check as check

    rank, world, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=datetime.timedelta(seconds=60))
    exchange = check.StoreExchange(store, rank, world, timeout_s=3)
    check._process["xla:0"] = exchange   # as use_store() would, without starting an XLA runtime
    for step in range(3):
        if rank == 1 and step == 2:
            print("rank 1 exits", flush=True)
            sys.exit(0)
        check.record("xla:0", "all-gather", "FSDP unit 'blocks.0'", 16386, (8,), "torch.float32", [[0, 1, 2]])
        try:
            check.check("xla:0", site=f"rank {rank}'s loop")
        except check.CollectiveMismatchError as exc:
            print(f"{type(exc).__name__}: {exc}".replace("\\n", " | "), flush=True)
            sys.exit(0)
    print("agreed", flush=True)
""")


def _run_store_ranks(script, world):
    """Run ``script`` in ``world`` processes, one rank each, meeting through a TCPStore; return their outputs."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "CPU_NUM_DEVICES"}   # one XLA device per process
    env.update(PYTHONPATH=str(Path(__file__).resolve().parent.parent), XLA_FSDP_CHECK_COLLECTIVES="1",
               PJRT_DEVICE="CPU")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r), str(world), str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    return [out.strip() for out, _ in outputs]


def test_a_process_that_never_reaches_the_step_marker_is_named_within_the_timeout():
    start = time.monotonic()
    outputs = _run_store_ranks(DYING_RANK, world=3)
    assert outputs[1] == "rank 1 exits", outputs
    for out in (outputs[0], outputs[2]):
        assert out.startswith(CollectiveCheckTimeout.__name__), outputs
        assert "rank 1 did not reach step marker #3 within 3 s" in out, outputs
    assert time.monotonic() - start < 60


HOOKED_RANK = textwrap.dedent("""
    import datetime, sys, torch, torch.distributed as dist, torch_xla
    from xla_fsdp import _collective_check as check

    rank, world, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    device = str(torch_xla.device())
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=datetime.timedelta(seconds=60))
    check.use_store(store, rank, world)
    check.install_from_environment()     # what a root unit's first forward does with XLA_FSDP_CHECK_COLLECTIVES=1
    x = torch.ones(4).to(device)
    for step in range(2):
        check.record(device, "all-gather", "FSDP unit 'blocks.0'", 16386, (4,), torch.float32, [[0, 1]])
        if rank == 1 and step == 1:
            check.record(device, "reduce-scatter", "FSDP unit 'blocks.0'", 24578, (8,), torch.float32, [[0, 1]])
        x = x + 1
        try:
            torch_xla.sync()
        except check.CollectiveMismatchError as exc:
            print(f"{type(exc).__name__}: {exc}".replace("\\n", " | "), flush=True)
            sys.exit(0)
    print("agreed", flush=True)
""")


def test_outside_the_helper_torch_xla_sync_checks_through_the_store_before_it_launches():
    # The TPU path, one process per device, up to the launch: torch_xla.sync() runs the check first.
    outputs = _run_store_ranks(HOOKED_RANK, world=2)
    assert len(set(outputs)) == 1, outputs          # the same error in both processes
    message = outputs[0]
    assert message.startswith(CollectiveMismatchError.__name__) and "before torch_xla.sync() #2" in message, message
    assert "rank 1: reduce-scatter of FSDP unit 'blocks.0'" in message, message
