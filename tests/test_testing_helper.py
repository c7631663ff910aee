"""``run_on_cpu_devices``: ordinary user code runs on several CPU XLA devices."""

import subprocess
import sys
import textwrap

import pytest
import torch
import torch_xla
import torch_xla.core.xla_model as xm

from xla_fsdp.testing import run_on_cpu_devices


def test_results_come_back_in_rank_order():
    assert run_on_cpu_devices(lambda rank, k: rank * k, 4, 10) == [0, 10, 20, 30]


def test_user_code_with_sync_item_cpu_and_an_all_reduce_works():
    def fn(rank):
        device = torch_xla.device()
        # Built on the host and moved: a constant made on the device would put
        # the rank into the graph, and ranks with different graphs cannot meet.
        x = torch.full((3,), float(rank)).to(device)
        total = xm.all_reduce(xm.REDUCE_SUM, x, groups=[[0, 1, 2, 3], [4, 5, 6, 7]])  # no channel id
        torch_xla.sync()
        return total.cpu().tolist(), (x + 1).sum().item()

    results = run_on_cpu_devices(fn, 4)
    assert [r[0] for r in results] == [[6.0, 6.0, 6.0]] * 4
    assert [r[1] for r in results] == [3.0, 6.0, 9.0, 12.0]


@pytest.mark.parametrize("world", [2, 4])
def test_reading_collective_results_before_the_step_marker_works(world):
    # torch_xla's xm.all_reduce takes no channel id; read before the step marker, each rank ran its graph on
    # its own and XLA aborted the process after 10 s. The helper gives user collectives channel ids.
    def fn(rank):
        device = torch_xla.device()
        x = torch.full((3,), float(rank + 1)).to(device)
        total = xm.all_reduce(xm.REDUCE_SUM, x)
        early = [total.sum().item()]                               # read before any torch_xla.sync()
        pair = [torch.full((2, 2), float(rank)).to(device), torch.ones(5).to(device)]
        xm.all_reduce(xm.REDUCE_MAX, pair, scale=2.0)              # the in-place list form
        early += [pair[0].cpu().tolist(), pair[1].cpu().tolist()]
        early.append(xm.all_gather(x.reshape(1, 3)).sum(1).cpu().tolist())
        torch_xla.sync()
        return early

    n = world * (world + 1) / 2
    for early in run_on_cpu_devices(fn, world):
        assert early == [3 * n, [[2.0 * (world - 1)] * 2] * 2, [2.0] * 5, [3.0 * r for r in range(1, world + 1)]]


def test_a_collective_issued_on_one_rank_only_is_an_error_naming_it():
    def fn(rank):
        x = torch.ones(3).to(torch_xla.device())
        if rank == 1:
            x = xm.all_reduce(xm.REDUCE_SUM, x)
        torch_xla.sync()

    with pytest.raises(RuntimeError, match=r"(?s)First difference: collective 0 of the step:.*rank 1: all-reduce of "
                                           r"xm.all_reduce.*float32\[3\].*issue xm.all_reduce on every rank"):
        run_on_cpu_devices(fn, 2)


def test_an_exception_on_one_rank_is_raised_with_its_rank():
    def fn(rank):
        torch_xla.sync()
        if rank == 2:
            raise KeyError("boom")
        torch_xla.sync()

    with pytest.raises(KeyError, match="boom") as info:
        run_on_cpu_devices(fn, 4)
    assert "rank 2 of 4" in "".join(info.value.__notes__)


def test_a_rank_that_catches_exceptions_does_not_hide_the_rank_that_failed():
    def fn(rank):
        if rank == 1:
            torch_xla.sync()
            raise KeyError("boom")
        try:  # rank 0 waits in one of these syncs for rank 1's second, which never comes
            torch_xla.sync()
            torch_xla.sync()
        except Exception as exc:
            raise RuntimeError("rank 0's own handler") from exc

    with pytest.raises(KeyError, match="boom") as info:
        run_on_cpu_devices(fn, 2)
    assert "rank 1 of 2" in "".join(info.value.__notes__)


def test_too_many_ranks_for_the_process_is_a_clear_error():
    with pytest.raises(ValueError, match="has 8 CPU XLA devices"):
        run_on_cpu_devices(lambda rank: rank, 16)


def test_a_function_defined_in_a_main_script_runs(tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent("""
        import torch, torch.nn as nn, torch_xla
        from xla_fsdp import XlaFullyShardedDataParallel as FSDP
        from xla_fsdp.testing import run_on_cpu_devices

        def train(rank):
            gen = torch.Generator().manual_seed(0)
            model = nn.Linear(5, 3)
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen))
            model = FSDP(model)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            loss = model(torch.ones(2, 5, device=torch_xla.device())).sum()
            loss.backward()
            opt.step()
            torch_xla.sync()
            return loss.item()

        if __name__ == "__main__":
            losses = run_on_cpu_devices(train, 2)
            assert len(losses) == 2 and losses[0] == losses[1], losses
            print("OK", losses)
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "OK" in done.stdout


def test_keep_freed_host_memory_serves_large_blocks_from_the_heap():
    # conftest configured the devices, which applies it; a 100 MB block is then
    # not a fresh mmap (glibc's mallinfo2().hblkhd: bytes in mmapped blocks).
    code = textwrap.dedent("""
        import ctypes, ctypes.util, sys
        from xla_fsdp.testing import keep_freed_host_memory

        class MallInfo2(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in
                        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallinfo2.restype = MallInfo2
        libc.malloc.restype = ctypes.c_void_p
        if sys.argv[1] == "keep":
            assert keep_freed_host_memory()
        block = libc.malloc(100 << 20)
        print(libc.mallinfo2().hblkhd >> 20)
        libc.free(ctypes.c_void_p(block))
    """)

    def mapped_mb(mode):
        done = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True)
        return int(done.stdout)

    assert mapped_mb("default") >= 100    # glibc maps a block this large on its own
    assert mapped_mb("keep") == 0


def test_a_parity_check_that_trains_the_reference_on_the_host_first_runs(tmp_path):
    # PyTorch's autograd engine makes its per-device queues once, at the first
    # backward of the process; run here, before any XLA call, it sees no XLA devices.
    script = tmp_path / "parity.py"
    script.write_text(textwrap.dedent("""
        import torch, torch.nn as nn, torch_xla
        from xla_fsdp.testing import run_on_cpu_devices

        def make():
            model = nn.Linear(4, 2)
            with torch.no_grad():
                model.weight.copy_(torch.arange(8.0).reshape(2, 4) / 8)
                model.bias.zero_()
            return model

        reference = make()
        reference(torch.ones(3, 4)).pow(2).sum().backward()

        def train(rank):
            model = make().to(torch_xla.device())
            model(torch.ones(3, 4, device=torch_xla.device())).pow(2).sum().backward()
            torch_xla.sync()
            return model.weight.grad.cpu()

        grads = run_on_cpu_devices(train, 4)
        for grad in grads:
            torch.testing.assert_close(grad, reference.weight.grad)
        reference(torch.ones(3, 4)).sum().backward()   # host autograd still works afterwards
        print("OK")
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "OK" in done.stdout
