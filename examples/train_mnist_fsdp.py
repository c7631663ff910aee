"""Train a small CNN on handwritten digits with FSDP, then consolidate and check the checkpoint.

    python examples/train_mnist_fsdp.py                                   # the README's main job
    python examples/train_mnist_fsdp.py --num_devices 1 --num_epochs 5
    python examples/train_mnist_fsdp.py --use_nested_fsdp 0 --use_gradient_checkpointing 0   # ZeRO-2
    python examples/train_mnist_fsdp.py --dataset mnist --datadir ~/data/mnist   # real MNIST IDX files
    python examples/train_mnist_fsdp.py --pure_bf16                      # bf16 storage, BF16AdamW
    python examples/train_mnist_fsdp.py --cpu_offload                    # shards and AdamW state on the host
    python examples/train_mnist_fsdp.py --capture_step 0                 # trace every step (no capture_step)
    PJRT_DEVICE=TPU python examples/train_mnist_fsdp.py --dataset mnist --datadir ...   # on a TPU VM
    PJRT_DEVICE=CPU python examples/train_mnist_fsdp.py --num_epochs 1   # the TPU path, on one CPU device

The default data are scikit-learn's handwritten digits (1,797 8x8 images,
shipped with the package), split once into 1,437 training and 360 test images
(stratified, seed 0). Each conv block is its own FSDP unit (ZeRO-3) wrapped
around ``checkpoint_module``; the root holds the classifier. Every rank trains
on its slice of each global batch. After training each rank saves its shard
file, ``python -m consolidate`` merges them, and the merged weights are loaded
into the plain, unwrapped model on the host CPU (no XLA) and evaluated: its
accuracy must equal the sharded model's. The ranks start through
``common.launch``: CPU XLA devices as threads by default, ``torch_xla.launch``
when ``PJRT_DEVICE`` is set. On a pod slice the host that ran rank 0
consolidates, so ``--ckpt_dir`` must be storage every worker sees. Each
training step runs through ``xla_fsdp.capture_step`` (traced once, then its
compiled graph replayed), except with ``--cpu_offload``, which it cannot
capture, or ``--capture_step 0``.
"""

from __future__ import annotations

import argparse
import gzip
import struct
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (CPU_DEVICE_THREADS, choose_launcher, consolidate, launch, launch_time,  # noqa: E402
                    read_rank0_summary, write_rank0_summary)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# --------------------------------------------------------------------- data
def load_data(args):
    return load_digits_split() if args.dataset == "digits" else load_mnist(args.datadir)


def load_digits_split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0
    x_train, x_test, y_train, y_test = train_test_split(images, digits.target, test_size=0.2, random_state=0,
                                                        stratify=digits.target)
    return _tensors(x_train, y_train, x_test, y_test, mean=0.3, std=0.4)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, file holds {body.size} bytes of data")
    return body.reshape(shape)


def _find(datadir: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (datadir / name).exists():
            return datadir / name
    raise FileNotFoundError(f"{datadir}: no {stem}[.gz]; expected the four MNIST IDX files there")


def load_mnist(datadir: Path):
    parts = [_read_idx(_find(datadir, stem)) for stem in
             ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
              "t10k-labels-idx1-ubyte")]
    x_train, y_train, x_test, y_test = parts
    return _tensors(x_train / 255.0, y_train, x_test / 255.0, y_test, mean=0.1307, std=0.3081)


def _tensors(x_train, y_train, x_test, y_test, mean, std):
    def images(x):
        return ((torch.tensor(np.asarray(x), dtype=torch.float32) - mean) / std).unsqueeze(1)
    return (images(x_train), torch.tensor(np.asarray(y_train), dtype=torch.int64),
            images(x_test), torch.tensor(np.asarray(y_test), dtype=torch.int64))


# -------------------------------------------------------------------- model
class ConvBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, pool: bool):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.pool = pool

    def forward(self, x):
        x = F.relu(self.conv(x))
        return F.max_pool2d(x, 2) if self.pool else x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(ConvBlock(1, 16, False), ConvBlock(16, 32, True), ConvBlock(32, 64, True))
        self.fc = nn.Linear(64 * 2 * 2, 10)

    def forward(self, x):
        return self.fc(pool_to_2x2(self.blocks(x)).flatten(1))


def pool_to_2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.adaptive_avg_pool2d(x, 2)`` for square maps, as an ``avg_pool2d`` that XLA lowers.

    Adaptive pooling of h x h to 2 x 2 averages rows [0, ceil(h/2)) and
    [floor(h/2), h): a window of ceil(h/2) at stride floor(h/2). torch_xla
    lowers adaptive pooling only when h divides evenly and otherwise runs it
    on the host, reading the device in the middle of every step (MNIST's 7 x 7
    maps did; ``capture_step`` refuses such a step, which is how it was found).
    """
    h = x.shape[-1]
    return F.avg_pool2d(x, kernel_size=(h + 1) // 2, stride=h // 2)


def build_model(seed: int = 0) -> Net:
    gen = torch.Generator().manual_seed(seed)
    model = Net()
    with torch.no_grad():  # a seeded generator: the device threads share torch's global RNG
        for name, p in model.named_parameters():
            fan_in = p[0].numel() if p.dim() > 1 else p.numel() * 4
            p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / fan_in) ** 0.5 if p.dim() > 1
                    else torch.zeros_like(p))
    return model


def wrap(model: Net, args) -> nn.Module:
    from xla_fsdp import XlaFullyShardedDataParallel as FSDP
    from xla_fsdp import checkpoint_module
    options = dict(compute_dtype=DTYPES[args.compute_dtype] if args.compute_dtype != "float32" else None,
                   cpu_offload=args.cpu_offload)
    if args.use_nested_fsdp:
        for i, block in enumerate(model.blocks):
            block = checkpoint_module(block) if args.use_gradient_checkpointing else block
            model.blocks[i] = FSDP(block, reshard_after_forward=True, **options)
    elif args.use_gradient_checkpointing:
        for block in model.blocks:
            checkpoint_module(block)
    # The root's backward starts right after its forward: keep its parameters (ZeRO-2 style).
    return FSDP(model, reshard_after_forward=False, **options)


def accuracy(model, x, y, batch: int, device=None) -> float:
    correct = 0
    with torch.no_grad():
        for start in range(0, len(x), batch):
            xb = x[start:start + batch]
            xb = xb.to(device) if device is not None else xb
            correct += int((model(xb).argmax(1).cpu() == y[start:start + batch]).sum())
    return correct / len(x)


# ----------------------------------------------------------------- training
def checkpoint_prefix(args) -> str:
    return str(Path(args.ckpt_dir) / args.dataset)


def train(rank: int, world: int, args, initial_state: dict, launched_at: float) -> None:
    import torch_xla
    from tqdm import tqdm

    from xla_fsdp.sharded_checkpoint import save_sharded_checkpoint

    if args.batch_size % world:
        raise ValueError(f"--batch_size {args.batch_size} must divide by the world size {world}")
    device = torch_xla.device()
    x_train, y_train, x_test, y_test = load_data(args)
    dtype = torch.bfloat16 if args.pure_bf16 else torch.float32
    model = Net()
    model.load_state_dict(initial_state)
    model = wrap(model.to(dtype), args)
    if args.pure_bf16:
        from xla_fsdp.optim import BF16AdamW
        opt = BF16AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    per_rank = args.batch_size // world
    steps_per_epoch = len(x_train) // args.batch_size          # drop_last: one graph shape

    def train_step(images, labels):
        opt.zero_grad()
        loss = F.cross_entropy(model(images).float(), labels)
        loss.backward()
        opt.step()
        return loss.detach()

    from xla_fsdp import capture_step
    captured = bool(args.capture_step) and not args.cpu_offload   # offload syncs inside backward: not capturable
    run_step = capture_step(train_step) if captured else train_step
    order = torch.Generator().manual_seed(1)
    bar = tqdm(total=args.num_epochs * steps_per_epoch, desc="training", unit="step", disable=rank != 0)
    step, loss = 0, None
    for epoch in range(args.num_epochs):
        perm = torch.randperm(len(x_train), generator=order)
        model.train()
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size + rank * per_rank:i * args.batch_size + (rank + 1) * per_rank]
            loss = run_step(x_train[idx].to(device, dtype), y_train[idx].to(device))
            if not captured:
                torch_xla.sync()
            step += 1
            bar.update(1)
        bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.4f}")
    bar.close()
    model.eval()
    test_accuracy = accuracy(model, x_test.to(dtype), y_test, len(x_test), device)
    prefix = checkpoint_prefix(args)
    save_sharded_checkpoint(prefix, model, opt, step=step, extra={"test_accuracy": test_accuracy})
    if rank == 0:
        write_rank0_summary(prefix, launched_at, accuracy=test_accuracy, steps=step, world_size=world,
                            train_images=len(x_train), test_images=len(x_test), captured=captured)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dataset", choices=("digits", "mnist"), default="digits",
                        help="digits: scikit-learn's 8x8 digits (shipped); mnist: IDX files in --datadir")
    parser.add_argument("--datadir", type=Path, help="folder with the four MNIST IDX files (.gz or not)")
    parser.add_argument("--batch_size", type=int, default=64, help="global batch size (all ranks)")
    parser.add_argument("--num_epochs", type=int, default=15, help="passes over the training set")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    parser.add_argument("--use_nested_fsdp", type=int, choices=(0, 1), default=1,
                        help="1: each conv block is its own FSDP unit (ZeRO-3); 0: root only (ZeRO-2)")
    parser.add_argument("--use_gradient_checkpointing", type=int, choices=(0, 1), default=1,
                        help="checkpoint_module on each conv block")
    parser.add_argument("--compute_dtype", choices=tuple(DTYPES), default="float32",
                        help="dtype of the full parameters during compute (shards stay fp32)")
    parser.add_argument("--pure_bf16", action="store_true",
                        help="store parameters, gradients and AdamW moments in bf16 (cast before wrapping; 10 "
                        "bytes per parameter instead of 16) and step them with xla_fsdp.optim.BF16AdamW, whose "
                        "Kahan compensation keeps updates too small for bf16")
    parser.add_argument("--cpu_offload", action="store_true",
                        help="keep the shards, their gradients and the AdamW state on the host "
                        "(XlaFullyShardedDataParallel(cpu_offload=True)); the optimizer steps on the CPU")
    parser.add_argument("--capture_step", type=int, choices=(0, 1), default=1,
                        help="1: trace the training step once and replay its compiled graph (xla_fsdp.capture_step; "
                        "not with --cpu_offload); 0: trace every step")
    parser.add_argument("--ckpt_dir", default="runs/mnist_fsdp", help="where the shard files and the "
                        "consolidated checkpoint go")
    parser.add_argument("--num_devices", type=int, default=4,
                        help="CPU XLA devices, as threads of this process; ignored when PJRT_DEVICE is set")
    return parser


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dataset == "mnist" and args.datadir is None:
        parser.error("--dataset mnist needs --datadir")
    if choose_launcher() == CPU_DEVICE_THREADS and args.batch_size % args.num_devices:
        parser.error(f"--batch_size {args.batch_size} must divide by --num_devices {args.num_devices}")
    data = load_data(args)  # here only for the final evaluation on the host CPU
    Path(args.ckpt_dir).mkdir(parents=True, exist_ok=True)
    begin = launch_time()
    launch(train, args.num_devices, args, build_model().state_dict(), begin)
    trained = time.time() - begin
    prefix = checkpoint_prefix(args)
    sharded = read_rank0_summary(prefix, begin)
    if sharded is None:
        print(f"rank 0 ran on another host; its results and the consolidation are there ({prefix}_summary.json)")
        return {}
    world = sharded["world_size"]

    consolidated_path = Path(args.ckpt_dir) / f"{args.dataset}_consolidated.pth"
    consolidate(prefix, world, consolidated_path)
    dtype = torch.bfloat16 if args.pure_bf16 else torch.float32
    plain = Net().to(dtype)
    plain.load_state_dict(torch.load(consolidated_path, weights_only=True)["model"])
    plain.eval()
    plain_accuracy = accuracy(plain, data[2].to(dtype), data[3], len(data[2]))
    summary = {"sharded_accuracy": sharded["accuracy"], "consolidated_cpu_accuracy": plain_accuracy,
               "train_seconds": trained, "total_seconds": time.time() - begin}
    print(f"\n{args.dataset}: {sharded['train_images']} training / {sharded['test_images']} test images, "
          f"{world} XLA device(s), {sharded['steps']} steps"
          + (", pure bf16 (BF16AdamW)" if args.pure_bf16 else "") + (", CPU offload" if args.cpu_offload else "")
          + (", captured steps" if sharded.get("captured") else ""))
    print(f"test accuracy, sharded model on XLA:          {sharded['accuracy']:.2%}")
    print(f"test accuracy, consolidated model on host CPU: {plain_accuracy:.2%}")
    print(f"time: {trained:.1f} s training, {summary['total_seconds']:.1f} s in all")
    print(f"shard files:  {prefix}/step_*/{Path(prefix).name}_rank-*-of-{world:08d}.pth")
    print(f"consolidated: {consolidated_path}")
    if plain_accuracy != sharded["accuracy"]:
        raise SystemExit("the consolidated model's accuracy differs from the sharded model's")
    return summary


if __name__ == "__main__":
    main()
