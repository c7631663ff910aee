"""Ordinary user code that once gave wrong results or hung: each test names the pattern."""

import collections
import dataclasses
import os
import subprocess
import sys
import functools
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._pytree as pytree
import torch_xla

from support import FP32, make_batches, make_net
from xla_fsdp import XlaFullyShardedDataParallel as FSDP
from xla_fsdp._layout import ShardLayout
from xla_fsdp.testing import run_on_cpu_devices
from xla_fsdp.wrap import transformer_auto_wrap_policy

REPO = Path(__file__).resolve().parent.parent


def _full_params_left_on_modules(model: nn.Module) -> list[str]:
    """Names of full tensors (not the empty placeholders) still set as plain attributes on the wrapped modules."""
    return [f"{name}.{attr}" for name, m in model.named_modules() for attr in ("weight", "bias", "head", "gate")
            if isinstance(vars(m).get(attr), torch.Tensor) and vars(m)[attr].numel() > 0]


def test_dict_subclass_outputs_keep_their_type():
    @dataclasses.dataclass
    class Output(collections.OrderedDict):  # the shape of Hugging Face's ModelOutput
        logits: torch.Tensor = None

    pytree.register_pytree_node(Output, lambda o: (list(o.values()), list(o.keys())),
                                lambda values, keys: Output(**dict(zip(keys, values))))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return Output(logits=self.fc(x)), collections.OrderedDict(y=self.fc(x))

    def types(rank):
        output, ordered = FSDP(Model())(torch.ones(3, 4, device=torch_xla.device()))
        output.logits.sum().backward()
        return type(output).__name__, type(ordered).__name__

    assert run_on_cpu_devices(types, 2)[0] == ("Output", "OrderedDict")


def test_forward_with_grad_and_no_backward_keeps_no_full_parameters():
    def evaluate_without_no_grad(rank):
        model = FSDP(make_net(), reshard_after_forward=False)      # ZeRO-2: the root keeps them for backward
        x, _ = make_batches(1)[0]
        for _ in range(2):
            model(x.to(torch_xla.device()))                        # an eval loop that forgot torch.no_grad()
            torch_xla.sync()
        return _full_params_left_on_modules(model)

    assert run_on_cpu_devices(evaluate_without_no_grad, 2) == [[], []]


def test_model_code_reads_a_nested_unit_s_parameter_dtype_and_device_outside_its_forward():
    # Hugging Face's ViT casts its input to embeddings.patch_embeddings.projection.weight.dtype in the
    # enclosing model's forward, before the embeddings unit has gathered its weights.
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Sequential(nn.Linear(4, 6))
            self.head = nn.Linear(6, 2)

        def forward(self, x):
            weight = self.embed[0].weight
            return self.head(self.embed(x.to(weight.dtype).to(weight.device)))

    def train(rank):
        model = Outer()
        model.embed = FSDP(model.embed)
        model = FSDP(model)
        seen = (model.embed[0].weight.dtype, model.embed[0].weight.device.type, tuple(model.embed[0].weight.shape))
        model(torch.ones(3, 4, dtype=torch.float64, device=torch_xla.device())).sum().backward()
        torch_xla.sync()
        return seen, [p.grad is not None for p in model.parameters()], _full_params_left_on_modules(model)

    seen, has_grad, left = run_on_cpu_devices(train, 2)[0]
    assert seen == (torch.float32, "xla", (0,))   # [Note: placeholders between computes]: no data held
    assert all(has_grad) and left == []


def test_printing_a_wrapped_model_shows_its_layers():
    # nn.Linear's repr reads `self.bias is not None`, between computes.
    def text(rank):
        return repr(FSDP(nn.Sequential(nn.Linear(4, 6))))

    assert "Linear(in_features=4, out_features=6, bias=True)" in run_on_cpu_devices(text, 1)[0]


def test_training_after_a_forward_without_backward_is_unchanged():
    def losses(rank, warm_up):
        model = FSDP(make_net(), reshard_after_forward=False)
        opt = torch.optim.SGD(model.parameters(), lr=0.2)
        batches = make_batches(3)
        device = torch_xla.device()
        if warm_up:
            model(batches[2][0].to(device))
            torch_xla.sync()
        out = []
        for x, y in batches[:2]:
            opt.zero_grad()
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            loss.backward()
            opt.step()
            torch_xla.sync()
            out.append(loss.item())
        return out

    torch.testing.assert_close(run_on_cpu_devices(losses, 2, True), run_on_cpu_devices(losses, 2, False),
                               rtol=0, atol=0)


# Runs in a subprocess: before the fix, ranks issued different collectives, and
# XLA's CPU rendezvous aborted the whole process after 10 s.
_UNUSED_ON_SOME_RANKS = textwrap.dedent("""
    import torch, torch.nn as nn, torch.nn.functional as F, torch_xla
    from xla_fsdp import XlaFullyShardedDataParallel as FSDP
    from xla_fsdp.testing import run_on_cpu_devices

    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            gen = torch.Generator().manual_seed(0)
            self.experts = nn.ModuleList(nn.Linear(6, 3) for _ in range(2))
            with torch.no_grad():
                for p in self.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen))

        def forward(self, x, expert):
            return self.experts[expert](x)   # the other expert gets no gradient on this rank

    gen = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(2, 4, 6, generator=gen), torch.randint(0, 3, (2, 4), generator=gen)

    def train(rank, world):
        model = FSDP(Experts())
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        device = torch_xla.device()
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(xs[rank].to(device), expert=rank), ys[rank].to(device)).backward()
            opt.step()
            torch_xla.sync()
        return {k: v.cpu() for k, v in model.full_state_dict(rank0_only=False).items()}

    results = run_on_cpu_devices(train, 2, 2)
    # The reference: the data-parallel mean of the two ranks' losses, unsharded, on the host.
    model = Experts()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        (sum(F.cross_entropy(model(xs[r], expert=r), ys[r]) for r in range(2)) / 2).backward()
        opt.step()
    expected = model.state_dict()
    for got in results:
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, rtol=1.3e-6, atol=1e-5, msg=name)
    print("ok")
""")


def test_a_parameter_unused_on_some_ranks_gets_a_zero_gradient_there_and_training_matches():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", _UNUSED_ON_SOME_RANKS], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_zero_grad_discards_gradients_accumulated_under_no_sync():
    def grads(rank, clear):
        model = FSDP(make_net())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        device = torch_xla.device()
        (x0, y0), (x1, y1) = make_batches(2)
        with model.no_sync():
            F.cross_entropy(model(x0.to(device)), y0.to(device)).backward()
        if clear == "optimizer":
            opt.zero_grad()
        elif clear == "optimizer, set_to_none=False":
            opt.zero_grad(set_to_none=False)
        elif clear == "model":
            model.zero_grad()
        F.cross_entropy(model(x1.to(device)), y1.to(device)).backward()
        torch_xla.sync()
        return {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}

    def fresh(rank):
        model = FSDP(make_net())
        x1, y1 = make_batches(2)[1]
        F.cross_entropy(model(x1.to(torch_xla.device())), y1.to(torch_xla.device())).backward()
        torch_xla.sync()
        return {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}

    expected = run_on_cpu_devices(fresh, 2)
    for clear in ("optimizer", "optimizer, set_to_none=False", "model"):
        for got, want in zip(run_on_cpu_devices(grads, 2, clear), expected):
            assert got.keys() == want.keys(), clear
            for name in want:
                torch.testing.assert_close(got[name], want[name], **FP32, msg=lambda m: f"{clear}: {name}: {m}")
    kept = run_on_cpu_devices(grads, 2, "nothing")[0]
    assert not all(torch.allclose(kept[n], expected[0][n]) for n in kept)  # no zero_grad: the sum of both


def test_unfreezing_a_parameter_after_wrapping_gives_it_its_gradient():
    world = 2
    x, y = make_batches(1)[0]

    def gate_grad(rank):
        model = FSDP(make_net())                       # blocks.0.gate is frozen when wrapped
        shard = dict(model.named_parameters())["_fsdp_shard__blocks__0__gate"]
        shard.requires_grad_(True)
        frozen_now = dict(model.named_parameters())["_fsdp_shard__head"].requires_grad_(False)
        per = x.shape[0] // world
        xs, ys = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        F.cross_entropy(model(xs.to(torch_xla.device())), ys.to(torch_xla.device())).backward()
        torch_xla.sync()
        return shard.grad.cpu() if shard.grad is not None else None, frozen_now.grad

    results = run_on_cpu_devices(gate_grad, world)
    reference = make_net()
    reference.blocks[0].gate.requires_grad_(True)
    F.cross_entropy(reference(x), y).backward()
    layout = ShardLayout(reference.blocks[0].gate.shape, world)
    for rank, (grad, head_grad) in enumerate(results):
        assert grad is not None, "the unfrozen parameter got no gradient"
        torch.testing.assert_close(grad, layout.shard(reference.blocks[0].gate.grad, rank), **FP32)
        assert head_grad is None, "the parameter frozen after wrapping got a gradient"


def test_a_sharding_rank_that_is_not_the_device_s_place_in_its_group_is_refused():
    def wrap(rank):
        FSDP(make_net(), sharding_groups=[[0, 1], [2, 3]], sharding_rank=(rank + 1) % 2, sharding_world_size=2)

    try:
        run_on_cpu_devices(wrap, 4)
    except ValueError as exc:
        assert "sharding_rank" in str(exc) and "sharding_groups" in str(exc), exc
    else:
        raise AssertionError("a permuted sharding_rank was accepted")


def test_buffer_dtype_casts_for_compute_but_state_dicts_keep_the_original_dtype():
    def dtypes(rank):
        model = FSDP(make_net(), compute_dtype=torch.bfloat16)
        state = model.state_dict()
        full = model.full_state_dict(rank0_only=False)
        model.load_state_dict(state)
        return model.module.scale.dtype, state["_fsdp_wrapped_module.scale"].dtype, full["scale"].dtype

    assert run_on_cpu_devices(dtypes, 2)[0] == (torch.bfloat16, torch.float32, torch.float32)


def test_meta_model_without_param_init_fn_is_materialised_with_reset_parameters():
    def build(rank):
        with torch.device("meta"):
            net = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
        model = FSDP(net, flatten_parameters=False)
        return {k: v.cpu() for k, v in model.full_state_dict(rank0_only=False).items()}

    state = run_on_cpu_devices(build, 2)[0]
    assert set(state) == {"0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias"}
    assert all(torch.isfinite(v).all() for v in state.values())
    torch.testing.assert_close(state["1.weight"], torch.ones(8), rtol=0, atol=0)   # LayerNorm.reset_parameters
    assert state["0.weight"].abs().max() <= 0.5 + 1e-6                            # kaiming_uniform bound 1/sqrt(4)


def test_param_init_fn_runs_in_each_unit_on_its_own_module_after_its_nested_units():
    class Inner(nn.Sequential):
        pass

    class Outer(nn.Sequential):
        pass

    def only_meta_tensors(module):
        seen.append(type(module).__name__)
        for m in module.modules():
            if any(t.is_meta for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]):
                m.to_empty(device="cpu", recurse=False)
                m.reset_parameters()

    def calls(rank, init):
        with torch.device("meta"):
            net = Outer(nn.Linear(4, 4), Inner(nn.Linear(4, 4)))
        policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={Inner})
        FSDP(net, param_init_fn=init, auto_wrap_policy=policy)
        return list(seen)

    seen = []
    assert run_on_cpu_devices(calls, 1, only_meta_tensors)[0] == ["Inner", "Outer"]
    with pytest.raises(ValueError, match=r"param_init_fn changed the parameters of nested FSDP unit '1'"):
        run_on_cpu_devices(calls, 1, lambda m: m.to_empty(device="cpu"))
