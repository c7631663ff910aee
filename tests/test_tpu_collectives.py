"""The collectives the TPU path runs, run here ([Note: collectives on TPU] in xla_fsdp/_collectives.py)."""

import os
import subprocess
import sys
import threading
from pathlib import Path

import torch
import torch_xla
import torch_xla.core.xla_model as xm

from support import Config, step_hlo
from xla_fsdp import _collectives
from xla_fsdp._collectives import ShardingGroup, _complete_replica_groups
from xla_fsdp.testing import run_on_cpu_devices

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
TPU_DEFAULT = Config(wrap="zero3", fsdp=(("pin_layout_in_collective_ops", True),))  # torch_xla's default


def test_layouts_are_not_pinned_across_devices_on_a_tpu_either(monkeypatch):
    runtime = _collectives.xr

    class OnTpu:  # the runtime as the test helper patches it, except that it reports a TPU
        def __getattr__(self, name):
            return (lambda: "TPU") if name == "device_type" else getattr(runtime, name)

    monkeypatch.setattr(_collectives, "xr", OnTpu())
    assert run_on_cpu_devices(lambda r: ShardingGroup.create(pin_layout=True).pin_layout, 2) == [False, False]
    assert run_on_cpu_devices(lambda r: ShardingGroup.create(pin_layout=True).pin_layout, 1) == [True]


def test_the_step_graph_with_torch_xlas_default_all_gathers_with_channel_ids():
    hlo = step_hlo(2, TPU_DEFAULT)
    gathers = [line for line in hlo.splitlines() if " all-gather(" in line]
    assert gathers and all("channel_id=" in line for line in gathers)
    assert " all-reduce(" not in hlo


def _lowered(tensor: torch.Tensor) -> str:
    return torch_xla._XLAC._get_xla_tensors_hlo([tensor])


def test_a_pinned_all_gather_is_a_rank_dependent_all_reduce_that_drops_its_channel_id():
    groups = _complete_replica_groups([[0, 1]])

    one_rank_at_a_time = threading.Lock()

    def lower(rank: int) -> str:
        shard = torch.full((4,), float(rank)).to(torch_xla.device())
        # Lowered, never run: on CPU devices the ranks' all-reduces get different op ids and abort.
        # torch_xla's own all_gather and all_reduce (which the pinned all_gather calls by its module name):
        # run_on_cpu_devices runs xm.all_gather unpinned in its threads and builds xm.all_reduce from two
        # collectives with channel ids. Tracing needs no other rank, so the ranks take turns.
        all_gather = getattr(xm.all_gather, "__wrapped__", xm.all_gather)
        with one_rank_at_a_time:
            helpers = xm.all_reduce
            xm.all_reduce = getattr(helpers, "__wrapped__", helpers)
            try:
                return _lowered(all_gather(shard, 0, groups=groups, pin_layout=True, channel_id=5,
                                           use_global_device_ids=True))
            finally:
                xm.all_reduce = helpers

    rank0, rank1 = run_on_cpu_devices(lower, 2)
    for hlo in (rank0, rank1):
        assert " all-reduce(" in hlo and " all-gather(" not in hlo and "channel_id" not in hlo
    assert rank0 != rank1


def test_a_pinned_reduce_scatter_keeps_its_channel_id_and_runs_on_two_devices():
    groups = _complete_replica_groups([[0, 1]])

    def reduce_scatter(rank: int):
        full = (torch.arange(8.0) + 10 * rank).to(torch_xla.device())
        shard = xm.reduce_scatter(xm.REDUCE_SUM, full, 1.0, 0, 2, groups=groups, pin_layout=True, channel_id=5,
                                  use_global_device_ids=True)
        hlo = _lowered(shard)
        torch_xla.sync()
        return hlo, shard.cpu()

    expected = (2 * torch.arange(8.0) + 10).reshape(2, 4)
    for rank, (hlo, shard) in enumerate(run_on_cpu_devices(reduce_scatter, 2)):
        assert " reduce-scatter(" in hlo and "channel_id=5" in hlo
        torch.testing.assert_close(shard, expected[rank], rtol=0, atol=0)


ALIASING_RUN = """
import os, sys
from xla_fsdp.testing import configure_cpu_devices
configure_cpu_devices(1)
os.environ["XLA_ENABLE_PARAM_ALIASING"] = "1"   # the TPU default, which the CPU helper turns off
import torch_xla.core.xla_model as xm
xm.get_xla_supported_devices()                  # start the runtime: the helper then leaves it so
sys.path.insert(0, sys.argv[1])
from support import Config
from test_parity import assert_matches_reference
assert_matches_reference(Config(wrap="zero3", fsdp=(("pin_layout_in_collective_ops", True),)), 1)
print("matches the unsharded reference")
"""


def test_training_with_parameter_aliasing_on_matches_the_reference_at_world_size_1(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("CPU_NUM_DEVICES", "PJRT_DEVICE")}
    env.update(XLA_FLAGS=f"--xla_dump_to={tmp_path}", PYTHONPATH=os.pathsep.join([str(ROOT), str(TESTS)]))
    done = subprocess.run([sys.executable, "-c", ALIASING_RUN, str(TESTS)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "matches the unsharded reference" in done.stdout
    aliased = [p for p in tmp_path.glob("*.txt") if "input_output_alias=" in p.read_text()]
    assert aliased, "no compiled step aliased a parameter: aliasing was not on"
