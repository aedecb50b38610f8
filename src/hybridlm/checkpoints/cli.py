"""``hybridlm convert``: between hybridlm's checkpoint format and the Hugging Face families'."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from hybridlm.checkpoints.hf import FAMILY_NAMES
from hybridlm.checkpoints.safetensors_io import existing_files
from hybridlm.checkpoints.tokenizer import TOKENIZER_FILES

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | None) -> int | None:
    """'5GB' -> 5_000_000_000; None -> None."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise ValueError(f"--max-shard-size {text!r}: give a size like 500MB or 5GB")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def cmd_convert(args: argparse.Namespace) -> int:
    from hybridlm.checkpoints import save_pretrained
    from hybridlm.loading import load_model, parse_dtype

    if args.to == "hybridlm" and args.family is not None:
        raise ValueError("--family applies to --to hf only")
    model = load_model(args.src, dtype=parse_dtype(args.dtype))
    source = Path(args.src)
    extra = existing_files(source, TOKENIZER_FILES) if source.is_dir() else {}
    target = save_pretrained(
        model,
        args.dst,
        format=args.to,
        family=args.family,
        max_shard_bytes=parse_size(args.max_shard_size),
        extra_files=extra,
    )
    size = sum(p.stat().st_size for p in target.iterdir())
    print(f"wrote {target} ({args.to}, {model.num_parameters():,} parameters, {size / 1e6:,.1f} MB)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint between hybridlm's format and a Hugging Face family's")
    p.add_argument("src", help="checkpoint directory (hybridlm or Hugging Face), or a preset name (random weights)")
    p.add_argument("dst", help="directory to write (replaced atomically if it exists)")
    p.add_argument("--to", choices=("hf", "hybridlm"), required=True, help="format to write")
    p.add_argument(
        "--family",
        choices=tuple(FAMILY_NAMES),
        default=None,
        help="Hugging Face family for --to hf (default: the source's family, else chosen from the block types)",
    )
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: as stored)")
    p.add_argument("--max-shard-size", default=None, help="split the weights into shards, e.g. 5GB")
    p.set_defaults(func=cmd_convert)
