"""``moeguard defense-eval``: the undefended model vs defended ones, under the same attacks and budgets."""

from __future__ import annotations

import argparse

from moeguard.cli.common import add_config_arguments, add_model_arguments, config_from_args, loading_options, print_json
from moeguard.errors import InputError

# The label-paying attacker's grid replaces these settings of its re-alignment runs, and its target is the head start's.
GRID_FIELDS = ("acquisition", "steps_per_round", "lr", "seed", "target_retention")


def register(subparsers: argparse._SubParsersAction) -> None:
    from moeguard.defense.evaluation import DefenseEvalSettings

    parser = subparsers.add_parser(
        "defense-eval",
        help="decide whether a defense works: utility, knowledge loss, the carver's head start over training from "
        "scratch, labels to the target, authorised use",
        description=(
            "Evaluate the undefended model and each defended model with the same data and the same strongest attacker "
            "(see moeguard.defense.evaluation and moeguard.attack). Every run is saved when it finishes; rerun the same "
            "command to continue an interrupted evaluation. Writes OUT/defense_eval.json, OUT/defense_eval.md and "
            "OUT/figures/."
        ),
    )
    add_model_arguments(parser, help="the undefended model (directory, hub id or 'demo')")
    parser.add_argument("--defended", action="append", required=True, metavar="NAME=PATH",
                        help="a defended model and the name it gets in the tables (repeatable)")
    parser.add_argument("--out", required=True, help="output directory (also holds the per-run cache)")
    add_config_arguments(parser, DefenseEvalSettings, flags={"permitted": "--permit"},
                         exclude=GRID_FIELDS)
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of the tables")
    parser.set_defaults(run=run, resume_with="")


def run(args: argparse.Namespace) -> int:
    from moeguard.defense.evaluation import DefenseEvalSettings, evaluate_defenses
    from moeguard.defense.report import markdown_tables, write_report
    from moeguard.io import check_output
    from moeguard.zoo import local_model_path, resolve_model_source

    models = {"undefended": args.model}
    for entry in args.defended:
        name, _, path = entry.partition("=")
        if not name or not path or name in models:
            raise InputError(f"--defended {entry!r}: give NAME=PATH with a new name (taken: {', '.join(models)}).")
        models[name] = path
    settings = config_from_args(args, DefenseEvalSettings)
    settings.check()
    check_output(args.out, inputs=[local_model_path(path) for path in models.values()], directory=True, resumable=True)
    loading = loading_options(args)
    sources = {name: resolve_model_source(path, progress=not args.quiet) for name, path in models.items()}
    result = evaluate_defenses(sources, settings, args.out, loading=loading, progress=not args.quiet)
    write_report(result, args.out)
    print_json(result.to_dict()) if args.json else print(markdown_tables(result))
    return 0
