"""``python -m flute_vllm <command>``.

Commands: ``quantize``, ``eval``, ``convert``, ``smollm2`` (fetch the bundled demo model),
``autotune`` (measure this GPU's kernel-path crossovers, write its config). Any other first argument that
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

COMMANDS = ("quantize", "eval", "smollm2", "convert", "autotune")


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
    nfl = q.add_argument_group("NFL (learned scales)")
    nfl.add_argument("--nfl", action="store_true", help="learn the group scales on calibration text (NF table)")
    nfl.add_argument("--nfl-table", action="store_true", help="with --nfl: learn each layer's table too")
    nfl.add_argument("--calibration", default=None,
                     help="calibration text file (default: the Python docs bundled with CPython)")
    nfl.add_argument("--samples", type=_positive, default=16, help="calibration windows")
    nfl.add_argument("--seq-len", type=_positive, default=128, help="tokens per calibration window")
    nfl.add_argument("--steps", type=_positive, default=20, help="optimizer steps per decoder block")
    nfl.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate of the log-scales")

    e = sub.add_parser("eval", help="perplexity of a dense or flute model on a text (sliding window)")
    e.add_argument("model", help="model directory or hub id (dense or flute)")
    e.add_argument("--text", required=True, help="text file to score")
    e.add_argument("--max-length", type=_positive, default=1024)
    e.add_argument("--stride", type=_positive, default=512)
    e.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    e.add_argument("--device", default=None)

    s = sub.add_parser("smollm2", help="write the bundled SmolLM2-135M-Instruct as a dense HF directory")
    s.add_argument("dst")

    a = sub.add_parser("autotune", help="time the CUDA kernel paths on this GPU and write its dispatch config (~1 min)")
    a.add_argument("--out", default=None, help="config file to write (default: ~/.cache/flute_vllm/configs/<gpu>.json)")
    a.add_argument("--quick", action="store_true", help="one shape instead of three")

    from .convert import add_convert_parser

    add_convert_parser(sub)
    return parser


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) <= 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive integer")
    return int(value)


def _existing_file(parser, flag: str, path):
    if path is not None and not os.path.isfile(path):
        parser.error(f"{flag} {path}: no such file")
    return path


def _quantize(args, parser) -> None:
    src = args.src or args.src_opt
    dst = args.dst or args.dst_opt
    if not src or not dst:
        parser.error("quantize needs SRC and DST (or --pretrained_model_name_or_path and --save_directory)")
    if args.nfl_table and not args.nfl:
        parser.error("--nfl-table needs --nfl")
    _existing_file(parser, "--calibration", args.calibration)
    if not args.nfl:
        from .checkpoint import quantize_model_dir

        quantize_model_dir(src, dst, args.bits, args.group_size, args.table, args.modules_to_not_convert, args.device)
    else:
        if args.table != "nf":
            parser.error("--nfl starts from the NF table: drop --table")
        import torch

        from . import hf
        from .checkpoint import load_dense, load_tokenizer
        from .nfl import nfl_quantize

        from transformers import AutoConfig

        # learn in float32, save in the checkpoint's own dtype
        dtype = getattr(AutoConfig.from_pretrained(src), "dtype", None) or torch.bfloat16
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        model, tokenizer = load_dense(src, dtype=torch.float32), load_tokenizer(src)
        texts = [open(args.calibration).read()] if args.calibration else None
        nfl_quantize(model, tokenizer, args.bits, args.group_size, texts, samples=args.samples, seq_len=args.seq_len,
                     steps=args.steps, lr=args.lr, learn_table=args.nfl_table,
                     modules_to_not_convert=args.modules_to_not_convert, device=args.device)
        hf.save_pretrained(model.to(dtype), dst, tokenizer=tokenizer)
    print(f"wrote {dst}")


def _eval(args, parser) -> None:
    _existing_file(parser, "--text", args.text)
    import torch

    from . import hf
    from .checkpoint import load_tokenizer
    from .evaluate import perplexity

    model = hf.from_pretrained(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    ppl = perplexity(model, load_tokenizer(args.model), open(args.text).read(), args.max_length, args.stride)
    print(f"perplexity {ppl:.4f}  model {args.model}  text {args.text}")


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
    try:
        if args.command == "quantize":
            _quantize(args, parser)
        elif args.command == "eval":
            _eval(args, parser)
        elif args.command == "smollm2":
            from .demo import smollm2

            print(smollm2(args.dst))
        elif args.command == "autotune":
            from pathlib import Path

            from .autotune import autotune

            autotune(Path(args.out) if args.out else None, quick=args.quick)
        elif args.command == "convert":
            from .convert import run_convert

            run_convert(args)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        # bad paths, unknown model types, shapes that cannot be quantized: one clear line, exit 1
        sys.exit(f"error: {e}")
