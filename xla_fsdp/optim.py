"""AdamW for pure-bf16 training: bf16 parameters, gradients and moments, compensated updates.

    from xla_fsdp.optim import BF16AdamW
    model = XlaFullyShardedDataParallel(build_model().to(torch.bfloat16))
    optimizer = BF16AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)

Why an optimizer of its own. Stored in bf16 end to end, a model needs 8 bytes
per parameter (parameter, gradient, two moments) plus 2 for this optimizer's
compensation buffer, against 16 for fp32 masters with fp32 AdamW; divided by
the world size under FSDP. But bf16 keeps 8 significant bits: adding an
update to a parameter rounds it to within 2^-9 of the parameter's magnitude,
and a late-training AdamW step (lr x ~1 relative to weights of order 0.1-1)
is often smaller than that, so plain AdamW on bf16 parameters silently drops
most of its updates and stalls. The moments have the same problem: with
beta2 = 0.999 the second moment moves by 0.1% a step, under bf16's
resolution, so rounded to nearest it can never decrease and only grows when
a squared gradient exceeds it about threefold.

What this optimizer does about it, per parameter:

- The arithmetic of a step is done in fp32 on temporaries (on an XLA device
  they fuse into the step's graph; nothing fp32 persists between steps).
- ``compensation="kahan"`` (default): Kahan summation. A bf16 buffer per
  parameter holds what the last rounding of the parameter lost; it is added
  to the next update, so small updates accumulate until they move the bf16
  parameter, and over many steps the parameter follows the fp32 trajectory
  within about one bf16 rounding. 2 bytes per parameter.
- ``compensation="stochastic"``: the new parameter is rounded up or down at
  random with probabilities that make it exact in expectation. No buffer, but
  noise of up to one bf16 step per update, and device random numbers.
- ``compensation="none"``: round to nearest, like ``torch.optim.AdamW`` on
  bf16 parameters but with fp32 arithmetic (for comparison).
- The moments are stored in the parameter's dtype and, when that is bf16,
  rounded stochastically (``moment_rounding="stochastic"``, default), which
  keeps their running averages unbiased; ``"nearest"`` is deterministic but
  lets the second moment stick at its largest values (see above).

The update is AdamW as ``torch.optim.AdamW`` defines it (decoupled weight
decay ``p -= lr * wd * p``, bias-corrected moments, ``eps`` added outside the
square root). For fp32 parameters none of the above applies: the step runs
exactly ``torch.optim.AdamW``'s single-tensor operations, so an fp32 model
trains identically with either optimizer. Parameter groups may mix dtypes.

Like ``torch.optim.AdamW`` (non-capturable), the step count is a host
tensor and the bias corrections are host numbers, so a step reads nothing back
from the device. With ``capturable=True`` (which ``capture_step`` sets, as it
does for torch's AdamW) the step count is a device tensor and the bias
corrections and the learning rate (a number or a device tensor) are device
arithmetic, so a captured graph computes them itself; for fp32 parameters the
update is then ``torch.optim.AdamW``'s capturable single-tensor operations.
State entries are tensors (``step`` on the host;
``exp_avg``, ``exp_avg_sq`` and ``compensation`` with the parameter's shape,
dtype and device), so ``state_dict()`` / ``load_state_dict()`` and the
sharded checkpoints and ``python -m consolidate --optimizer`` carry them like
AdamW's. Stochastic rounding draws from torch_xla's per-device RNG, which
advances at every ``torch_xla.sync()``: a run resumed from a sharded
checkpoint (which restores that RNG) repeats the original bit for bit when it
syncs as often as the original did after the save (tested at world size 2).
"""

from __future__ import annotations

from typing import Iterable, Union

import torch
from torch import Tensor

__all__ = ["BF16AdamW", "round_stochastic_to_bf16"]

COMPENSATIONS = ("kahan", "stochastic", "none")
MOMENT_ROUNDINGS = ("stochastic", "nearest")
_LOW_PRECISION = (torch.bfloat16, torch.float16)


# bf16 keeps 8 significant bits. For a bf16 value v = m * 2^e (1 <= m < 2), the
# neighbours are v + 2^(e-7) above and v - 2^(e-7) below (2^(e-8) if m == 1).
# v * (1 +- _NEIGHBOUR) moves |v| by 1.25 * m * 2^(e-8), which lies strictly
# between half and one and a half of the gap on either side for every m, so
# rounding it to nearest bf16 lands exactly on the neighbour.
_NEIGHBOUR = 1.25 * 2.0 ** -8


def round_stochastic_to_bf16(x: Tensor) -> Tensor:
    """``x`` (fp32) rounded to one of its two bf16 neighbours at random, exact in expectation.

    Plain arithmetic, no bit casts: on an XLA device ``Tensor.view(dtype)`` and
    ``torch.nextafter`` fall back to the host (a device read in the middle of a
    step), while these operations lower to XLA. Rounds to nearest, then moves
    to the neighbour on the other side of ``x`` with probability (distance to
    the nearest) / (gap between the two). Infinities and NaN round to
    themselves; values in bf16's subnormal range round to nearest.
    """
    nearest = x.to(torch.bfloat16).float()
    residual = x - nearest
    away = nearest * (1 + _NEIGHBOUR)     # the neighbour of larger magnitude, rounded below
    toward = nearest * (1 - _NEIGHBOUR)
    other = torch.where(residual * nearest > 0, away, toward).to(torch.bfloat16).float()
    gap = other - nearest
    probability = torch.where(gap != 0, residual / gap, torch.zeros_like(gap))
    return torch.where(torch.rand_like(x) < probability, other, nearest).to(torch.bfloat16)


class BF16AdamW(torch.optim.Optimizer):
    """AdamW whose bf16 parameters keep bf16 state and lose no small updates (see the module docstring).

    Args:
        params: parameters or parameter groups, e.g. an FSDP wrapper's ``model.parameters()``
            (its shards). Real floating-point dtypes; bf16 or fp16 ones get the compensated update.
        lr: learning rate (>= 0).
        betas: coefficients of the running averages of the gradient and its square, each in [0, 1).
        eps: added to the denominator, outside the square root (>= 0).
        weight_decay: decoupled weight decay coefficient (>= 0).
        compensation: ``"kahan"`` (a compensation buffer per low-precision parameter),
            ``"stochastic"`` (stochastic rounding; bf16 parameters only) or ``"none"``.
        moment_rounding: how bf16 moments are rounded when stored: ``"stochastic"`` or ``"nearest"``.
        capturable: keep the step count on the device and compute the bias corrections there (see the
            module docstring); ``capture_step`` turns it on.
    """

    def __init__(self, params: Iterable[Union[Tensor, dict]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 compensation: str = "kahan", moment_rounding: str = "stochastic", capturable: bool = False):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, compensation=compensation,
                        moment_rounding=moment_rounding, capturable=capturable)
        _check_hyperparameters(defaults, "")
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        index = len(self.param_groups) - 1
        _check_hyperparameters(group, f"param group {index}: ")  # a group may override the defaults
        for i, p in enumerate(group["params"]):
            if not p.is_floating_point():
                raise TypeError(f"BF16AdamW: parameter {i} of param group {index} (shape {tuple(p.shape)}) has "
                                f"dtype {p.dtype}; expected a real floating-point dtype")
            if group["compensation"] == "stochastic" and p.dtype == torch.float16:
                raise TypeError(f"BF16AdamW: compensation='stochastic' rounds to bfloat16 only; parameter {i} of "
                                f"param group {index} (shape {tuple(p.shape)}) is float16 (use 'kahan')")

    def __setstate__(self, state: dict) -> None:
        # load_state_dict ends here; a state dict saved by torch.optim.AdamW lacks this optimizer's options.
        super().__setstate__(state)
        for index, group in enumerate(self.param_groups):
            for name in ("compensation", "moment_rounding", "capturable"):
                group.setdefault(name, self.defaults[name])
            _check_hyperparameters(group, f"param group {index}: ")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"BF16AdamW does not support sparse gradients (parameter of shape "
                                       f"{tuple(p.shape)})")
                state = self.state[p]
                if not state:
                    self._init_state(p, state, group)
                state["step"] += 1
                if p.dtype in _LOW_PRECISION:
                    _low_precision_step(p, p.grad, state, group)
                else:
                    _torch_adamw_step(p, p.grad, state, group)
        return loss

    @staticmethod
    def _init_state(p: Tensor, state: dict, group: dict) -> None:
        # The step lives on the host, as in torch.optim.AdamW: bias corrections are host numbers
        # (on the device when capturable).
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if group["capturable"] else "cpu")
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["compensation"] == "kahan" and p.dtype in _LOW_PRECISION:
            state["compensation"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _check_hyperparameters(options: dict, where: str) -> None:
    def number(name: str, value, low: float, high: float | None = None) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"BF16AdamW: {where}{name} must be a number, got {type(value).__name__} {value!r}")
        if not value >= low or (high is not None and not value < high):
            expected = f"in [{low}, {high})" if high is not None else f">= {low}"
            raise ValueError(f"BF16AdamW: {where}{name} must be {expected}, got {value!r}")

    lr = options["lr"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"BF16AdamW: {where}a tensor lr must have one element, got shape {tuple(lr.shape)}")
    else:
        number("lr", lr, 0.0)
    betas = options["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"BF16AdamW: {where}betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        number(f"betas[{i}]", beta, 0.0, 1.0)
    number("eps", options["eps"], 0.0)
    number("weight_decay", options["weight_decay"], 0.0)
    for name, allowed in (("compensation", COMPENSATIONS), ("moment_rounding", MOMENT_ROUNDINGS)):
        if options[name] not in allowed:
            raise ValueError(f"BF16AdamW: {where}{name} must be one of {allowed}, got {options[name]!r}")


def _on_device(state: dict) -> bool:
    return state["step"].device.type != "cpu"


def _bias_corrections(state: dict, group: dict) -> tuple:
    """(lr / (1 - beta1^t), sqrt(1 - beta2^t)): host numbers, or device tensors when the step count is one."""
    beta1, beta2 = group["betas"]
    if _on_device(state):
        step = state["step"]
        return group["lr"] / (1 - beta1 ** step), (1 - beta2 ** step).sqrt()
    step = state["step"].item()  # a host tensor: no device read
    return group["lr"] / (1 - beta1 ** step), (1 - beta2 ** step) ** 0.5


def _torch_adamw_step(p: Tensor, grad: Tensor, state: dict, group: dict) -> None:
    """``torch.optim.AdamW``'s single-tensor update, operation for operation (capturable or not)."""
    beta1, beta2 = group["betas"]
    if group["weight_decay"] != 0:
        p.mul_(1 - group["lr"] * group["weight_decay"])
    state["exp_avg"].lerp_(grad, 1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size, bias_correction2_sqrt = _bias_corrections(state, group)
    if _on_device(state):
        # addcdiv_ takes a number, so the step size goes into the denominator, as torch's capturable AdamW does.
        step_size_neg = step_size.neg()
        denom = (state["exp_avg_sq"].sqrt() / (bias_correction2_sqrt * step_size_neg)).add_(
            group["eps"] / step_size_neg)
        p.addcdiv_(state["exp_avg"], denom)
        return
    denom = (state["exp_avg_sq"].sqrt() / bias_correction2_sqrt).add_(group["eps"])
    p.addcdiv_(state["exp_avg"], denom, value=-step_size)


def _store(target: Tensor, value: Tensor, stochastic: bool) -> None:
    target.copy_(round_stochastic_to_bf16(value) if stochastic and target.dtype == torch.bfloat16 else value)


def _low_precision_step(p: Tensor, grad: Tensor, state: dict, group: dict) -> None:
    """The same update in fp32 arithmetic, stored back with compensation."""
    beta1, beta2 = group["betas"]
    g = grad.float()
    exp_avg = state["exp_avg"].float().lerp_(g, 1 - beta1)
    exp_avg_sq = state["exp_avg_sq"].float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
    stochastic_moments = group["moment_rounding"] == "stochastic"
    _store(state["exp_avg"], exp_avg, stochastic_moments)
    _store(state["exp_avg_sq"], exp_avg_sq, stochastic_moments)

    step_size, bias_correction2_sqrt = _bias_corrections(state, group)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(group["eps"])
    old = p.float()
    update = exp_avg.div_(denom).mul_(-step_size)
    if group["weight_decay"] != 0:
        decay = group["lr"] * group["weight_decay"]
        if isinstance(decay, Tensor):  # a device learning rate (capturable): alpha takes numbers only
            update.sub_(old * decay)
        else:
            update.add_(old, alpha=-decay)
    compensation = group["compensation"]
    if compensation == "kahan":
        if "compensation" not in state:  # state from torch.optim.AdamW, or from another compensation
            state["compensation"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        update.add_(state["compensation"].float())
        new = (old + update).to(p.dtype)
        # What this rounding lost (old and new are close: their difference is exact in fp32).
        state["compensation"].copy_(update.sub_(new.float().sub_(old)))
        p.copy_(new)
    elif compensation == "stochastic":
        p.copy_(round_stochastic_to_bf16(old.add_(update)))
    else:
        p.copy_(old.add_(update))
