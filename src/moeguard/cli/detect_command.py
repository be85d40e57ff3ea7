"""``moeguard detect``: is a suspect model a pruned (and re-aligned) derivative of a parent?"""

from __future__ import annotations

import argparse

from moeguard.cli.common import add_model_arguments, load_model, print_json
from moeguard.errors import InputError
from moeguard.forensics import DEFAULT_ALPHA, DEFAULT_GROUP_SIZE, DEFAULT_PROBES, DEFAULT_WEIGHT_ROWS, detect
from moeguard.io import check_outputs, write_json
from moeguard.zoo import local_model_path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "detect",
        help="decide whether a suspect MoE was carved out of a parent (pruned, re-ordered, fine-tuned, cast)",
        description=(
            "Compares every suspect expert with every parent expert (responses to shared probes, weights, router rows) "
            "against a null distribution from hidden-permuted copies, matches them per layer and prints the verdict, "
            "its score and the recovered kept set. Models are loaded in their stored dtype unless --dtype says otherwise."
        ),
    )
    add_model_arguments(parser, flag="--parent", help="the original model (directory, hub id or 'demo')")
    add_model_arguments(parser, flag="--suspect", help="the model suspected to be derived from it (directory or hub id)")
    parser.add_argument("--out", default=None, help="write the full verdict as JSON to this file")
    parser.add_argument("--figure", default=None, help="write a PNG of the per-layer expert similarity with the matches")
    parser.add_argument("--overwrite", action="store_true", help="replace --out and --figure if they exist")
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help=f"false-positive rate of the verdict (default {DEFAULT_ALPHA:g})")
    parser.add_argument("--probes", type=int, default=DEFAULT_PROBES, help=f"probe inputs per expert (default {DEFAULT_PROBES})")
    parser.add_argument(
        "--group-size", type=int, default=DEFAULT_GROUP_SIZE,
        help=f"permutations in the null, the comparison included (default {DEFAULT_GROUP_SIZE})",
    )
    parser.add_argument(
        "--weight-rows", type=int, default=DEFAULT_WEIGHT_ROWS,
        help=f"weight rows per expert in the weight signal, 0 = all (default {DEFAULT_WEIGHT_ROWS})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the probes and of the weight rows (default 0)")
    parser.add_argument("--json", action="store_true", help="print the verdict as JSON instead of the summary")
    parser.set_defaults(run=run, dtype="auto")


def run(args: argparse.Namespace) -> int:
    if args.weight_rows < 0:
        raise InputError(f"--weight-rows must be 0 (all rows) or positive, got {args.weight_rows}.")
    check_outputs([args.out, args.figure], inputs=[local_model_path(args.parent), local_model_path(args.suspect)],
                  overwrite=args.overwrite)
    parent = load_model(args, args.parent)
    suspect = load_model(args, args.suspect)
    verdict = detect(
        parent,
        suspect,
        alpha=args.alpha,
        probes=args.probes,
        group_size=args.group_size,
        weight_rows=args.weight_rows or None,
        seed=args.seed,
        progress=not args.quiet,
    )
    if args.out:
        write_json(args.out, verdict.to_dict())
    if args.figure:
        from moeguard.forensics.figures import plot_verdict

        plot_verdict(verdict, args.figure)
    print_json(verdict.to_dict()) if args.json else print(verdict.summary())
    return 0
