"""``moeguard attribute``: which experts a task needs, from the routing on its data."""

from __future__ import annotations

import argparse

from moeguard.attribution import CRITERIA, DEFAULT_CRITERIA, TOKEN_MODES
from moeguard.cli.common import add_dataset_arguments, add_model_arguments, describe_choices, load_model, parse_list, print_json, user_task
from moeguard.errors import InputError


def parse_criteria(text: str, ablation: bool) -> list[str]:
    """``"frequency,reap"`` (+ ``ablation`` with ``--ablation``) -> criterion names, checked."""
    names = parse_list(text, what="--criteria", choices=CRITERIA, noun="criteria")
    return names + ["ablation"] if ablation and "ablation" not in names else names


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "attribute",
        help="measure which experts a task uses (routing frequency, gate mass, REAP, EAN, ablation)",
        description="Run the model over task data and record, per MoE layer and expert, the routing statistics "
        "every attribution criterion is computed from. The output serves any criterion and keep count later "
        "(`moeguard prune --attribution`). Under torchrun each process takes a shard of the data.",
    )
    add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--task", help="a built-in task name (see moeguard.data.BUILTIN_TASKS)")
    source.add_argument("--data", help="a JSONL file of {prompt, answer}, {prompt, choices, label} or {text} lines")
    add_dataset_arguments(parser, source)
    parser.add_argument("--split", default="train", help="split of a built-in task or a dataset (default: train, the "
                        "attacker's own data)")
    parser.add_argument("--samples", type=int, default=256, help="number of examples (default: 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the built-in task's examples")
    parser.add_argument("--tokens", choices=TOKEN_MODES, default="all",
                        help="whose routing counts: every token, the prompt's, or the answer's (the reference answer, the "
                        "correct choice; default: all)")
    parser.add_argument("--criteria", default=",".join(DEFAULT_CRITERIA),
                        help=f"criteria to collect statistics for (default: {','.join(DEFAULT_CRITERIA)}; "
                        "frequency, gate_mass and co-activation are always collected): " + describe_choices(CRITERIA))
    parser.add_argument("--ablation", action="store_true",
                        help="also measure the knowledge loss of masking each expert alone (one pass per expert: slow)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=None, help="truncate examples to this many tokens")
    parser.add_argument("--out", required=True, help="attribution JSON to write (tensors go beside it as .safetensors)")
    parser.add_argument("--figures", help="directory for heatmaps (layer x expert) of every criterion")
    parser.add_argument("--compare", nargs="+", default=[], metavar="ATTRIBUTION",
                        help="attributions of other tasks on this model: report the overlap of top expert sets")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(run=run, resume_with="")


def load_data(args: argparse.Namespace):
    from moeguard.data import load_task

    if args.samples < 1:
        raise InputError(f"--samples must be a positive integer, got {args.samples}.")
    if args.task:
        user_task(args)  # refuses --metric / --answer-pattern for built-in tasks
        return load_task(args.task, args.split, limit=args.samples, seed=args.seed)
    return user_task(args, split=args.split, limit=args.samples)


def run(args: argparse.Namespace) -> int:
    from moeguard.attribution.figures import attribution_figures
    from moeguard.attribution.run import attribute, check_attribution_outputs
    from moeguard.distributed import is_main, process_group_from_environment
    from moeguard.io import check_output
    from moeguard.zoo import local_model_path

    criteria = parse_criteria(args.criteria, args.ablation)
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be a positive integer, got {args.batch_size}.")
    inputs = [local_model_path(args.model), args.data, *args.compare]
    check_attribution_outputs(args.out, inputs=inputs, overwrite=args.overwrite)
    if args.figures:
        check_output(args.figures, inputs=inputs, directory=True, resumable=True)  # existing figures are replaced
    data = load_data(args)
    with process_group_from_environment():
        moe = load_model(args)
        result = attribute(
            moe, data, tokens=args.tokens, criteria=criteria, batch_size=args.batch_size, max_length=args.max_length,
            out=args.out, compare=args.compare, overwrite=args.overwrite, progress=not args.quiet,
        )
        if not is_main():
            return 0  # ranks other than 0 write and print nothing
    figures = attribution_figures(result.attribution, result.compared, args.figures) if args.figures else []
    if args.json:
        print_json({"out": str(result.path), "summary": result.summary.to_dict(), "overlap": result.overlaps,
                    "figures": [str(p) for p in figures]})
    else:
        print(result.describe())
        if figures:
            print(f"  figures: {', '.join(str(p) for p in figures)}")
    return 0
