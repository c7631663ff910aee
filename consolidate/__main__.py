"""Command line of ``consolidate``; see ``python -m consolidate --help``."""

from __future__ import annotations

import argparse
import sys
import warnings

from . import FORMATS, ConsolidationError, consolidate_sharded_model_checkpoints, reshard_checkpoints


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m consolidate",
        description="Merge the per-rank shard files of an FSDP checkpoint (xla_fsdp's or torch_xla's) into one "
                    "full checkpoint, or reshard them for another number of devices. Bad input is reported in "
                    "one line naming the file, with exit status 2, and nothing is written.")
    parser.add_argument("--ckpt_prefix", required=True,
                        help="a checkpoint directory of save_sharded_checkpoint (its newest committed step is "
                             "read, through its manifest), one of its step_N directories, or the prefix of a set "
                             "of shard files without a manifest, e.g. /ckpts/run1 for "
                             "/ckpts/run1_rank-00000000-of-00000004.pth (taken literally: [ ] * ? are not patterns); "
                             "a directory without steps is such a prefix too, as torch_xla reads it (out/ with "
                             "--ckpt_suffix 'rank*-of-*-pytorch_model.bin' reads out/rank0-of-4-pytorch_model.bin, "
                             "...)")
    parser.add_argument("--ckpt_suffix", default="*.pth",
                        help="glob appended to the prefix to find every rank's file (sets without a manifest)")
    parser.add_argument("--step", type=int, help="with a checkpoint directory: the committed step to read "
                                                 "(default: the newest)")
    parser.add_argument("--sharding_group", type=int, default=0,
                        help="with a checkpoint of several sharding groups: which group's shards to read")
    parser.add_argument("--save_path", default="",
                        help="output file (orbax, dcp: directory); default PREFIX_consolidated.pth (.safetensors, "
                             ".orbax, .dcp). With --reshard: the prefix of the new shard files, default PREFIX_worldM")
    parser.add_argument("--optimizer", action="store_true",
                        help="also consolidate the optimizer state into a state dict for the same optimizer "
                             "built on the unwrapped model (--format pth: torch.optim's, by parameter index; dcp: "
                             "get_optimizer_state_dict's, by parameter name). Files without optimizer_param_names "
                             "(torch_xla's programs save none) are matched by parameter order where that is "
                             "unambiguous, else this is an error naming the file and what is missing; without "
                             "this flag such a state is left out with one line saying so")
    parser.add_argument("--reshard", type=int, metavar="M",
                        help="instead of one full checkpoint, write an M-rank checkpoint directory (model and "
                             "optimizer, same step, committed with a manifest) to resume on M devices with "
                             "load_sharded_checkpoint; --save_path names the directory (default PREFIX_worldM)")
    parser.add_argument("--format", choices=FORMATS, default="pth",
                        help="pth: {'model': state_dict} for torch.load, written tensor by tensor; safetensors: "
                             "the state dict under the original names; orbax: an orbax PyTree of numpy arrays; "
                             "dcp: a torch.distributed.checkpoint directory of {'model': state_dict, 'optim': "
                             "optimizer state by name (with --optimizer)}, for dcp.load into the plain or an "
                             "FSDP2 model (get_state_dict / set_state_dict), written tensor by tensor")
    parser.add_argument("--verify", action="store_true",
                        help="re-read the output and check it against the shards (NaN equals NaN) before it "
                             "replaces anything; works with every format and --reshard")
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
                  memory_budget_mb=args.memory_budget_mb, verify=args.verify, step=args.step,
                  sharding_group=args.sharding_group)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if args.reshard is not None:
                if args.format != "pth":
                    raise ConsolidationError("--reshard writes xla_fsdp shard files; --format does not apply")
                paths = reshard_checkpoints(args.ckpt_prefix, args.ckpt_suffix, args.reshard, args.save_path,
                                            **common)
                done = f"wrote {len(paths)} shard files: {paths[0]} ... {paths[-1]}"
            else:
                _, path = consolidate_sharded_model_checkpoints(args.ckpt_prefix, args.ckpt_suffix, args.save_path,
                                                                optimizer=args.optimizer, format=args.format,
                                                                **common)
                done = f"wrote {path}"
    except (ConsolidationError, OSError) as exc:  # OSError: an output that cannot be written, already removed
        print(f"consolidate: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
              file=sys.stderr)
        return 2
    print(done + (" (verified)" if args.verify else ""))
    for w in caught:
        if issubclass(w.category, UserWarning):
            print(f"consolidate: warning: {w.message}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
