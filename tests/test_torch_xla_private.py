"""Each assumption of [Note: private torch_xla APIs] (``xla_fsdp/_torch_xla_private.py``), checked by name.

A torch_xla upgrade that changes one of them fails here, not as a wrong
captured step somewhere else.
"""

from __future__ import annotations

import torch
import torch_xla
import torch_xla.core.xla_model as xm

from xla_fsdp import _torch_xla_private as private
from xla_fsdp.testing import run_on_cpu_devices


def on_one_device(fn):
    return run_on_cpu_devices(lambda rank: fn(torch_xla.device()), 1)[0]


def test_torch_xla_is_the_release_these_assumptions_were_read_from():
    assert torch_xla.__version__.split("+")[0].startswith("2.9."), torch_xla.__version__
    assert torch.__version__.startswith("2.9."), torch.__version__


def test_graph_inputs_name_the_tensor_they_came_from_the_seed_and_python_numbers():
    def check(device):
        p = torch.randn(4).to(device)
        torch_xla.sync()
        before = private.tensor_id(p)
        with torch.no_grad():
            p.add_(p, alpha=2.5)                          # alpha: a Python number from the scalar cache
        assert private.tensor_id(p) != before             # an in-place op gives the tensor a new id
        noisy = p + torch.rand(4, device=device)          # the device RNG seed
        scaled = p * 3.5                                  # an operand: a tensor made during the trace
        ids, values = private.graph_inputs([p, noisy, scaled])
        assert before in ids
        assert private.SEED_INPUT_ID in ids
        assert private.SCALAR_INPUT_ID in ids
        assert any(i > private.tensor_id(p) for i in ids)
        seed = values[ids.index(private.SEED_INPUT_ID)]
        assert seed.dtype == torch.int64 and seed.dim() == 0
        torch_xla.sync()
        # The result of a replayed graph holds its data, no IR: its input names it by id and by the data object.
        hash_ = private.graph_hash([p * 1.5])
        private.compile_graph([p * 1.5])
        (result,) = private.run_graph(hash_, private.graph_inputs([p * 1.5])[1])
        identity = private.data_identity(result)
        ids, values = private.graph_inputs([result * 2.5])
        position = ids.index(private.tensor_id(result))
        assert private.data_identity(values[position]) == identity
        torch_xla.sync()

    on_one_device(check)


def test_a_compiled_graph_runs_again_on_new_inputs_and_refuses_pending_ones():
    def check(device):
        a, b = torch.randn(5).to(device), torch.randn(5).to(device)
        private.sync_tensors([a, b])
        out = a * b + a
        hash_ = private.graph_hash([out])
        private.compile_graph([out])
        ids, values = private.graph_inputs([out])
        by_id = {private.tensor_id(a): a, private.tensor_id(b): b}
        assert set(ids) == set(by_id)
        c, d = torch.randn(5), torch.randn(5)
        inputs = {private.tensor_id(a): c.to(device), private.tensor_id(b): d.to(device)}
        (result,) = private.run_graph(hash_, [inputs[i] for i in ids])
        torch.testing.assert_close(result.cpu(), c * d + c)
        pending = [inputs[i] * 1.5 for i in ids]
        try:
            private.run_graph(hash_, pending)
        except RuntimeError as error:
            assert private.is_pending_input_error(error)
        else:
            raise AssertionError("a pending input was not refused")
        torch_xla.sync()

    on_one_device(check)


def test_the_rng_seed_advances_as_the_note_says():
    def check(device):
        torch_xla.sync()
        private.set_seed(device, 12345)
        assert private.running_seed(device) == 12345 == private.host_seed(device)
        torch.rand(2, device=device)
        torch.rand(2, device=device)
        # Two random ops: the running seed advanced twice; the host seed did not.
        expected = private.next_running_seed(private.next_running_seed(12345))
        assert private.running_seed(device) == expected
        assert private.host_seed(device) == 12345
        torch_xla.sync()
        assert private.running_seed(device) == private.seed_after_step_marker(12345)
        # A seed above 2**63 survives the int64 device data.
        big = (1 << 64) - 5
        assert int(private.seed_tensor(big, device).cpu().item()) & ((1 << 64) - 1) == big

    on_one_device(check)


def test_the_report_lists_tensors_waiting_for_a_computation_only():
    def check(device):
        data = torch.randn(3).to(device)
        private.sync_tensors([data])
        pending = data * 2
        ids = private.pending_tensor_ids(device)
        assert private.tensor_id(pending) in ids and "f32[3]" in ids[private.tensor_id(pending)]
        assert private.tensor_id(data) not in ids
        torch_xla.sync()
        assert private.tensor_id(pending) not in private.pending_tensor_ids(device)

    on_one_device(check)


def test_step_closures_are_the_devices_list_that_a_sync_runs():
    def check(device):
        ran = []
        xm.add_step_closure(lambda: ran.append("sync"))
        assert len(private.step_closures()) == 1
        torch_xla.sync()
        assert ran == ["sync"] and private.step_closures() == []
        private.step_closures().append(lambda: ran.append("ours"))
        private.run_step_closures()
        assert ran == ["sync", "ours"]

    on_one_device(check)


def test_buffer_donor_aliasing_is_a_switch_that_is_put_back():
    before = private.XLAC._xla_get_enable_alias_with_buffer_donor_config()
    with private.aliasing_buffer_donors(not before):
        assert private.XLAC._xla_get_enable_alias_with_buffer_donor_config() == (not before)
    assert private.XLAC._xla_get_enable_alias_with_buffer_donor_config() == before
