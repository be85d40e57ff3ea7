"""``moeguard prune``: keep the experts an attribution ranks highest, delete the rest, save the model."""

from __future__ import annotations

import argparse

from moeguard.attribution import CRITERIA
from moeguard.cli.common import add_model_arguments, describe_choices, load_model, print_json
from moeguard.errors import InputError


def parse_protect(text: str | None) -> list[tuple[int, int]]:
    """``"0:3,1:5"`` -> ``[(0, 3), (1, 5)]`` (MoE layer : expert)."""
    if not text:
        return []
    pairs = []
    for item in text.split(","):
        layer, sep, expert = item.strip().partition(":")
        if not sep or not layer.strip().isdigit() or not expert.strip().isdigit():
            raise InputError(f"--protect takes LAYER:EXPERT pairs separated by commas (e.g. 0:3,1:5); got {item!r}.")
        pairs.append((int(layer), int(expert)))
    return pairs


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """How many experts to keep and how to rank them."""
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--keep", type=int, help="experts kept in every MoE layer (uniform)")
    size.add_argument("--coverage", type=float,
                      help="per layer, keep the fewest experts holding this fraction of the score mass (0-1]")
    size.add_argument("--budget", type=int, help="experts kept over all MoE layers together")
    parser.add_argument("--criterion", choices=list(CRITERIA), default="frequency",
                        help="attribution score ranking the experts (default frequency): " + describe_choices(CRITERIA))
    parser.add_argument("--least-used", action="store_true", help="keep the lowest-ranked experts instead (a baseline)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random criterion")
    parser.add_argument("--protect", help="experts never dropped, as LAYER:EXPERT pairs (e.g. 0:3,1:5)")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prune",
        help="physically remove the experts an attribution ranks lowest and save the smaller model",
        description="Physically remove experts and save a stock transformers model with moeguard_manifest.json. "
        "Every layer must keep the same number of experts (a stock config holds one count); for "
        "non-uniform plans use `moeguard sweep` (mask mode).",
    )
    add_model_arguments(parser)
    parser.add_argument("--attribution", required=True, help="attribution JSON written by `moeguard attribute` on this model")
    add_plan_arguments(parser)
    parser.add_argument("--out", required=True, help="output model directory")
    parser.add_argument("--streaming", action="store_true",
                        help="prune a local safetensors checkpoint shard by shard without loading it (for models larger than memory)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(run=run, resume_with="")


def run(args: argparse.Namespace) -> int:
    from moeguard.attribution import Attribution
    from moeguard.io import check_output
    from moeguard.pruning.prune import prune_model
    from moeguard.zoo import local_model_path, resolve_model_source

    plan_options = dict(
        keep=args.keep, coverage=args.coverage, budget=args.budget, criterion=args.criterion,
        least_used=args.least_used, protect=parse_protect(args.protect), seed=args.seed,
    )
    check_output(args.out, inputs=[local_model_path(args.model), args.attribution], overwrite=args.overwrite, directory=True)
    Attribution.load(args.attribution)  # a bad attribution is reported before the model is loaded
    if args.streaming:
        source = resolve_model_source(args.model, progress=not args.quiet)
        summary = prune_model(source, args.attribution, args.out, **plan_options, streaming=True, overwrite=args.overwrite,
                              progress=not args.quiet, trust_remote_code=args.trust_remote_code)
    else:
        summary = prune_model(load_model(args), args.attribution, args.out, **plan_options, overwrite=args.overwrite)
    if args.json:
        print_json(summary.to_dict())
    else:
        print(summary.describe())
    return 0
