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
