"""``python -m flute_vllm <command>``.

Commands: ``quantize``, ``smollm2`` (fetch the bundled demo model). Any other first argument that
names a Python module (e.g. ``vllm.entrypoints.openai.api_server``) is run after registering the
flute vLLM plugin, with the remaining arguments.
"""
from __future__ import annotations

import argparse
import os
import runpy
import sys
from typing import Optional, Sequence

from .format import SUPPORTED_GROUP_SIZES
from .tables import SUPPORTED_BITS, TABLE_KINDS

COMMANDS = ("quantize", "smollm2")


def _parse_table(value: str):
    if value in TABLE_KINDS:
        return value
    if os.path.exists(value):  # a file of 2^b numbers (a learned / custom table)
        with open(value) as f:
            return [float(v) for v in f.read().replace(",", " ").split()]
    raise argparse.ArgumentTypeError(f"--table {value!r}: use one of {TABLE_KINDS} or a file of 2^b numbers")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flute_vllm",
        description="LUT-quantized LLMs for vLLM. Also: python -m flute_vllm <module> [args] runs a "
        "module (e.g. vllm.entrypoints.openai.api_server) with the flute plugin registered.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a dense HF model into a flute checkpoint")
    q.add_argument("src", nargs="?", help="local HF model directory or hub id")
    q.add_argument("dst", nargs="?", help="output directory")
    # FLUTE's own spellings, so its documented commands keep working.
    q.add_argument("--pretrained_model_name_or_path", "--pretrained-model-name-or-path", dest="src_opt")
    q.add_argument("--save_directory", "--save-directory", dest="dst_opt")
    q.add_argument("--num-bits", "--num_bits", dest="bits", type=int, default=4, choices=SUPPORTED_BITS)
    q.add_argument("--group-size", "--group_size", dest="group_size", type=int, default=64,
                   choices=SUPPORTED_GROUP_SIZES, help="-1 = channel-wise")
    q.add_argument("--table", type=_parse_table, default="nf", help=f"{'|'.join(TABLE_KINDS)} or a file of values")
    q.add_argument("--modules-to-not-convert", nargs="*", default=None,
                   help="layer names kept dense (default: lm_head)")
    q.add_argument("--device", default=None, help="where to quantize (default: cuda if available)")

    s = sub.add_parser("smollm2", help="write the bundled SmolLM2-135M-Instruct as a dense HF directory")
    s.add_argument("dst")
    return parser


def _quantize(args, parser) -> None:
    src = args.src or args.src_opt
    dst = args.dst or args.dst_opt
    if not src or not dst:
        parser.error("quantize needs SRC and DST (or --pretrained_model_name_or_path and --save_directory)")
    from .checkpoint import quantize_model_dir

    quantize_model_dir(src, dst, args.bits, args.group_size, args.table, args.modules_to_not_convert, args.device)
    print(f"wrote {dst}")


def run_module(module: str, argv: Sequence[str]) -> None:
    """Register the plugin in this process, then run ``module`` as __main__ with ``argv``."""
    from . import register

    register()
    sys.argv = [module, *argv]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        return run_module(argv[0], argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "quantize":
        _quantize(args, parser)
    elif args.command == "smollm2":
        from .demo import smollm2

        print(smollm2(args.dst))
