"""Flags that several subcommands share, declared once so their names, types and help agree."""

from __future__ import annotations

import argparse


def add_device_flag(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")


def add_dtype_flag(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or auto (default: auto, as stored)")


def add_expert_parallel_flags(p: argparse.ArgumentParser, ranks: str, skew: bool = True) -> None:
    """``--ep N`` (``ranks`` says what the ranks do in this command) and, with ``skew``, ``--routing-skew S``.

    ``--ep`` is checked when the command runs (1 or more), where the refusal can name the command.
    """
    p.add_argument(
        "--ep",
        type=int,
        default=None,
        metavar="N",
        help="spread the routed experts over N ranks (expert parallelism): starts N local processes (gloo), or "
        f"joins torchrun's; {ranks}",
    )
    if skew:
        p.add_argument(
            "--routing-skew",
            type=float,
            default=None,
            metavar="S",
            help="unbalance the routing (a load generator): add a Zipf offset of exponent S (in units of the "
            "router's logit spread) to every router's logits, over a seeded order of the experts; 0 = none. "
            "Changes the model's outputs",
        )


def add_compile_flag(p: argparse.ArgumentParser) -> None:
    from hybridlm.compiled_decode import MODES

    p.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default=None,
        choices=MODES,
        metavar="MODE",
        help="run the decode step through torch.compile, checked against the eager step first (eager, with a "
        f"warning, where it fails); MODE is one of {', '.join(MODES)} (default: default). On CPU in fp32 the "
        "eager step's C kernels are faster; it pays with bf16 weights and on GPUs",
    )


def check_compile_flag(args: argparse.Namespace) -> None:
    """``--compile`` with what it cannot serve: refused by name."""
    if args.compile is None:
        return
    if args.ep is not None:
        raise ValueError("--compile does not combine with --ep: the experts' exchange between ranks splits the graph")
