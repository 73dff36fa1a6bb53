"""The ``deltaops`` command line: whole-checkpoint merge, compress and apply.

    deltaops merge CONFIG.yml OUT_DIR          mergekit's YAML, streamed tensor by tensor
    deltaops compress --base B --finetuned F --format FMT [options] OUT_DIR
                                               FMT: sparse, sign, ternary, int4, int2, lowrank
    deltaops apply --base B --delta D OUT_DIR  rebuild the fine-tune from base + delta
    deltaops info [PATH]                       backends, ISA, versions; or a model/delta folder
    deltaops bench                             a generated family merged, timed against a copy
    deltaops demo                              the main job on a small generated family

``torchrun --nproc_per_node=P -m deltaops merge ...`` splits a merge across
processes (gloo on CPU, nccl with --device cuda); the output is the same bytes.
Errors in the inputs (missing or corrupt shards, shape mismatches, NaN) exit
with status 2 and a message naming the tensor and the file.
"""

from __future__ import annotations

import argparse
import re
import sys

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MiB"``, ``"1e9"`` -> bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _run_options(args):
    from .checkpoint.merge import RunOptions

    return RunOptions(device=args.device, threads=args.threads, shard_size=args.shard_size,
                      seed=getattr(args, "seed", None) or 0, resume=getattr(args, "resume", False),
                      overwrite=args.overwrite, quiet=args.quiet,
                      check_nan=getattr(args, "check_nan", "output"))


def _common(parser, shard_default: str) -> None:
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--shard-size", type=parse_size, default=parse_size(shard_default),
                        help=f"largest output shard (default {shard_default})")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltaops", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    merge = sub.add_parser("merge", help="merge checkpoints from a mergekit YAML config")
    merge.add_argument("config", help="mergekit-style YAML (merge_method, base_model, models, ...)")
    merge.add_argument("out", help="output model folder")
    _common(merge, "5GB")
    merge.add_argument("--seed", type=int, default=0, help="seed of the random methods (dare, della)")
    merge.add_argument("--resume", action="store_true",
                       help="continue an interrupted run from its completed shards")
    merge.add_argument("--check-nan", default="output", choices=("output", "inputs", "off"),
                       help="output (default): a NaN in a merged tensor stops the run naming "
                            "the input tensor and file; inputs: also NaN that a random drop "
                            "removed; off")

    compress = sub.add_parser("compress", help="write the compressed delta of a fine-tune")
    compress.add_argument("--base", required=True)
    compress.add_argument("--finetuned", required=True)
    compress.add_argument("--format", default="sparse",
                          help="sparse (default), sign, ternary, int4, int2 or lowrank; an option "
                               "the format does not read is an error")
    compress.add_argument("--density", type=float, default=None,
                          help="sparse, ternary --method compeft: fraction of elements kept "
                               "(default 0.1)")
    compress.add_argument("--layout", default=None, choices=("auto", "coo", "bitmask"),
                          help="sparse: index layout (default auto)")
    compress.add_argument("--values-dtype", default=None,
                          help="sparse, lowrank: dtype of stored values / factors (default: the "
                               "model's)")
    compress.add_argument("--trim-scope", default="tensor", choices=("tensor", "model"),
                          help="sparse: top-k per tensor, or one top-k over the whole model")
    compress.add_argument("--method", default=None,
                          help="ternary: absmean (default) or compeft; lowrank: svd (default) "
                               "or randomized")
    compress.add_argument("--alpha", type=float, default=None,
                          help="ternary --method compeft: scale = alpha * std(delta) (default 1)")
    compress.add_argument("--granularity", default=None, choices=("tensor", "row"),
                          help="sign: one scale per tensor (default) or per row")
    compress.add_argument("--group-size", type=int, default=None,
                          help="int4, int2: elements per scale along the input dimension "
                               "(default 128; -1: one group per row)")
    compress.add_argument("--symmetric", action="store_true",
                          help="int4, int2: symmetric groups (no zero points stored)")
    compress.add_argument("--rank", type=int, default=None,
                          help="lowrank: rank per tensor (default 16, capped at min(out, in))")
    compress.add_argument("--seed", type=int, default=None,
                          help="lowrank --method randomized: seed of the test vectors (default 0)")
    compress.add_argument("--min-numel", type=int, default=1024,
                          help="tensors smaller than this (and 1-D ones) are stored whole")
    compress.add_argument("out", help="output delta folder")
    _common(compress, "2GB")

    apply = sub.add_parser("apply", help="rebuild a fine-tune from its base and a delta folder")
    apply.add_argument("--base", required=True)
    apply.add_argument("--delta", required=True)
    apply.add_argument("out", help="output model folder")
    _common(apply, "5GB")

    info = sub.add_parser("info", help="backends built and usable, CPU ISA, versions; or a folder")
    info.add_argument("path", nargs="?", help="a model folder or a delta folder to describe")

    bench = sub.add_parser("bench", help="time a merge of a generated family against a copy")
    bench.add_argument("--params", type=float, default=2e7, help="parameters per model")
    bench.add_argument("--dtype", default="bfloat16")

    demo = sub.add_parser("demo", help="the main job on a small generated model family")
    demo.add_argument("--params", type=float, default=2e7, help="parameters per model")
    demo.add_argument("--keep", default=None, help="keep the generated folders here")
    demo.add_argument("--kernels", action="store_true",
                      help="instead: the sparse ops on a generated delta, every backend")
    return parser


def _print_summary(what: str, summary, quiet: bool) -> None:
    print(f"deltaops {what}: {summary.line()}", file=sys.stderr if quiet else sys.stdout)


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    from .checkpoint.config import ConfigError
    from .checkpoint.io import CheckpointError

    try:
        _dispatch(args)
    except (CheckpointError, ConfigError) as error:
        print(f"deltaops {args.command}: error: {error}", file=sys.stderr)
        sys.exit(2)


def _dispatch(args) -> None:
    if args.command == "merge":
        from .checkpoint.config import load_config
        from .checkpoint.distributed import Group
        from .checkpoint.merge import run_merge

        config = load_config(args.config)
        group = Group(args.device)
        try:
            summary = run_merge(config, args.out, _run_options(args), group)
        finally:
            rank = group.rank
            group.close()
        if rank == 0:
            _print_summary("merge", summary, args.quiet)
    elif args.command == "compress":
        from .checkpoint.compress import CompressOptions, run_compress

        options = CompressOptions(format=args.format, density=args.density, layout=args.layout,
                                  values_dtype=args.values_dtype, trim_scope=args.trim_scope,
                                  method=args.method, alpha=args.alpha, rank=args.rank,
                                  group_size=args.group_size, symmetric=args.symmetric,
                                  granularity=args.granularity, seed=args.seed,
                                  min_numel=args.min_numel, shard_size=args.shard_size)
        summary = run_compress(args.base, args.finetuned, args.out, options, _run_options(args))
        _print_summary("compress", summary, args.quiet)
    elif args.command == "apply":
        from .checkpoint.compress import run_apply

        summary = run_apply(args.base, args.delta, args.out, _run_options(args))
        _print_summary("apply", summary, args.quiet)
    elif args.command == "info":
        if args.path:
            from .checkpoint.inspect import describe

            print(describe(args.path))
        else:
            from .info import main as info_main

            info_main()
    elif args.command == "bench":
        from .demo import bench

        bench(params=int(args.params), dtype=args.dtype)
    elif args.command == "demo":
        from .demo import kernels, run

        if args.kernels:
            kernels()
        else:
            run(params=int(args.params), keep=args.keep)
