"""Nested FSDP (ZeRO-3) with gradient checkpointing on 4 CPU XLA devices.

    bash scripts/demo.sh            # or: .venv/bin/python examples/demo_nested_fsdp.py --num_devices 8

A small residual MLP learns a synthetic 4-class problem (points labelled by
which of four fixed random directions they point along most). Every block is
its own FSDP unit wrapped around a checkpointed module; the root holds the
embedding and the head. Each rank trains on its slice of every global batch;
the loss printed is the mean over ranks. At the end the full parameters are
gathered on rank 0 and the unwrapped model is evaluated on the host.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_xla

from xla_fsdp import XlaFullyShardedDataParallel as FSDP
from xla_fsdp import checkpoint_module
from xla_fsdp.testing import run_on_cpu_devices

DIM, HIDDEN, CLASSES = 32, 64, 4


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.up = nn.Linear(DIM, HIDDEN)
        self.down = nn.Linear(HIDDEN, DIM)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


class Net(nn.Module):
    def __init__(self, depth: int):
        super().__init__()
        self.embed = nn.Linear(DIM, DIM)
        self.blocks = nn.Sequential(*[Block() for _ in range(depth)])
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)))


def make_data(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(1234))
    x = torch.randn(n, DIM, generator=gen)
    return x, (x @ directions.T).argmax(dim=1)


def build_model(depth: int) -> Net:
    torch.manual_seed(0)  # called once, before the device threads start
    return Net(depth)


def train(rank: int, args, initial_state: dict, world: int):
    device = torch_xla.device()
    model = Net(args.depth)
    model.load_state_dict(initial_state)
    for i, block in enumerate(model.blocks):
        model.blocks[i] = FSDP(checkpoint_module(block), reshard_after_forward=True)
    model = FSDP(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    x_train, y_train = make_data(args.steps * args.batch_size, seed=1)
    per_rank = args.batch_size // world
    losses = []
    for step in range(args.steps):
        start = step * args.batch_size + rank * per_rank
        x = x_train[start:start + per_rank].to(device)
        y = y_train[start:start + per_rank].to(device)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        model.clip_grad_norm_(1.0)
        opt.step()
        torch_xla.sync()
        losses.append(loss.item())
    return losses, model.full_state_dict()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--num_devices", type=int, default=4, help="CPU XLA devices (data-parallel ranks)")
    parser.add_argument("--steps", type=int, default=60, help="training steps")
    parser.add_argument("--batch_size", type=int, default=64, help="global batch size")
    parser.add_argument("--depth", type=int, default=3, help="residual blocks, one FSDP unit each")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    args = parser.parse_args()
    if args.batch_size % args.num_devices:
        parser.error(f"--batch_size {args.batch_size} must divide by --num_devices {args.num_devices}")

    initial = build_model(args.depth).state_dict()
    begin = time.time()
    results = run_on_cpu_devices(train, args.num_devices, args, initial, args.num_devices)
    elapsed = time.time() - begin
    for step in range(args.steps):
        mean = sum(r[0][step] for r in results) / args.num_devices
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {mean:.4f}")

    model = Net(args.depth)
    model.load_state_dict(results[0][1])
    x_test, y_test = make_data(2000, seed=2)
    with torch.no_grad():
        accuracy = (model(x_test).argmax(dim=1) == y_test).float().mean().item()
    print(f"\n{args.num_devices} CPU XLA devices, {args.steps} steps in {elapsed:.1f} s; "
          f"test accuracy of the gathered, unwrapped model: {accuracy:.1%}")


if __name__ == "__main__":
    main()
