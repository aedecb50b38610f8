"""``hybridlm convert``: between hybridlm's checkpoint format and the Hugging Face families'.

Every argument and the destination are checked before the model is loaded, so a typo costs nothing
and a convert never starts what it cannot finish; the files a user keeps beside the weights
(tokenizer, chat template, generation config, README, LICENSE) travel along.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from hybridlm.checkpoints.destination import carried_files, check_destination
from hybridlm.checkpoints.hf import FAMILY_NAMES
from hybridlm.cli_flags import add_dtype_flag

_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}  # fmt: skip


def parse_size(text: str | None, what: str = "--max-shard-size") -> int | None:
    """'5GB' -> 5_000_000_000, '1TiB' -> 2**40; None -> None; anything but a positive size is a ValueError
    naming ``what`` (the flag or argument it came from)."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*([-+]?\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise ValueError(f"{what} {text!r}: give a size like 500MB, 5GB or 1TB")
    size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size < 1:
        raise ValueError(f"{what} {text!r}: must be at least one byte")
    return size


def _check_export(src: str, to: str, family: str | None) -> None:
    """Whether the source's config can be written as asked, from its config.json alone."""
    from hybridlm.loading import resolve_config

    config = resolve_config(src)
    if to == "hf":
        from hybridlm.checkpoints.hf import choose_family

        choose_family(config, family).config_to_hf(config)


def cmd_convert(args: argparse.Namespace) -> int:
    from hybridlm.checkpoints import save_pretrained
    from hybridlm.loading import load_model, parse_dtype

    if args.to == "hybridlm" and args.family is not None:
        raise ValueError("--family applies to --to hf only")
    max_shard_bytes = parse_size(args.max_shard_size)
    dtype = parse_dtype(args.dtype)
    check_destination(args.dst, args.overwrite, source=args.src)
    _check_export(args.src, args.to, args.family)
    source = Path(args.src)
    try:
        model = load_model(args.src, dtype=dtype)
        target = save_pretrained(
            model,
            args.dst,
            format=args.to,
            family=args.family,
            max_shard_bytes=max_shard_bytes,
            extra_files=carried_files(source) if source.is_dir() else {},
            overwrite=args.overwrite,
        )
    except FileNotFoundError:
        raise
    except OSError as error:  # a read-only or full disk: the one line says where and why
        raise ValueError(f"{error.filename}: {error.strerror}" if error.filename else str(error)) from error
    size = sum(p.stat().st_size for p in target.iterdir())
    print(f"wrote {target} ({args.to}, {model.num_parameters():,} parameters, {size / 1e6:,.1f} MB)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    about = "convert a checkpoint between hybridlm's format and a Hugging Face family's"
    p = sub.add_parser(
        "convert",
        help=about,
        description=f"{about}. DST must not exist, be empty, or (with --overwrite) hold a previous checkpoint; "
        "the new one is written beside it and moved into place at the end. Tokenizer files, chat template, "
        "generation config, README and LICENSE come along from SRC.",
    )
    p.add_argument(
        "src", metavar="SRC", help="checkpoint directory (hybridlm or Hugging Face), or a preset name (random weights)"
    )
    p.add_argument(
        "dst",
        metavar="DST",
        help="directory to write: new, empty, or (with --overwrite) a previous checkpoint; never anything else",
    )
    p.add_argument("--to", choices=("hf", "hybridlm"), required=True, help="format to write")
    p.add_argument(
        "--family",
        choices=tuple(FAMILY_NAMES),
        default=None,
        help="Hugging Face family for --to hf (default: the source's family, else chosen from the block types)",
    )
    add_dtype_flag(p)
    p.add_argument("--max-shard-size", default=None, metavar="SIZE", help="split the weights into shards, e.g. 5GB")
    p.add_argument(
        "--overwrite", action="store_true", help="replace DST when it holds a previous checkpoint (and nothing else)"
    )
    p.set_defaults(func=cmd_convert)
