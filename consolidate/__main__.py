"""Command line of ``consolidate``; see ``python -m consolidate --help``."""

from __future__ import annotations

import argparse
import sys

from . import FORMATS, ConsolidationError, consolidate_sharded_model_checkpoints, reshard_checkpoints


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m consolidate",
        description="Merge the per-rank shard files of an FSDP checkpoint (xla_fsdp's or torch_xla's) into one "
                    "full checkpoint, or reshard them for another number of devices. Bad input is reported in "
                    "one line naming the file, with exit status 2, and nothing is written.")
    parser.add_argument("--ckpt_prefix", required=True,
                        help="prefix of the shard files, e.g. /ckpts/run1 for /ckpts/run1_rank-00000000-of-00000004.pth")
    parser.add_argument("--ckpt_suffix", default="*.pth",
                        help="glob appended to the prefix to find every rank's file")
    parser.add_argument("--save_path", default="",
                        help="output file (orbax: directory); default PREFIX_consolidated.pth (.safetensors, "
                             ".orbax). With --reshard: the prefix of the new shard files, default PREFIX_worldM")
    parser.add_argument("--optimizer", action="store_true",
                        help="also consolidate the optimizer state into a state dict for the same optimizer "
                             "built on the unwrapped model (xla_fsdp checkpoints, --format pth)")
    parser.add_argument("--reshard", type=int, metavar="M",
                        help="instead of one full checkpoint, write an M-rank sharded checkpoint (model and "
                             "optimizer) to resume on M devices")
    parser.add_argument("--format", choices=FORMATS, default="pth",
                        help="pth: {'model': state_dict} for torch.load, written tensor by tensor; safetensors: "
                             "the state dict under the original names; orbax: an orbax PyTree of numpy arrays")
    parser.add_argument("--verify", action="store_true", help="re-read the output and check it against the shards")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output instead of refusing")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    parser.add_argument("--memory_budget_mb", type=float, default=64,
                        help="tensors are read and written in groups of about this many MB; host memory grows "
                             "by about twice this (or twice the largest tensor), whatever the checkpoint's size")
    parser.add_argument("--unsafe_load", action="store_true",
                        help="load shard files with weights_only=False, which can run code stored in them: only "
                             "for files you trust whose contents weights_only rejects")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    common = dict(progress=not args.no_progress, weights_only=not args.unsafe_load, overwrite=args.overwrite,
                  memory_budget_mb=args.memory_budget_mb)
    try:
        if args.reshard is not None:
            if args.format != "pth":
                raise ConsolidationError("--reshard writes xla_fsdp shard files; --format does not apply")
            paths = reshard_checkpoints(args.ckpt_prefix, args.ckpt_suffix, args.reshard, args.save_path, **common)
            print(f"wrote {len(paths)} shard files: {paths[0]} ... {paths[-1]}")
            return 0
        _, path = consolidate_sharded_model_checkpoints(args.ckpt_prefix, args.ckpt_suffix, args.save_path,
                                                        optimizer=args.optimizer, format=args.format,
                                                        verify=args.verify, **common)
        print(f"wrote {path}" + (" (verified)" if args.verify else ""))
        return 0
    except ConsolidationError as exc:
        print(f"consolidate: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
